"""Everything that compares, sweeps or studies the method: the comparison's baselines (:mod:`.baselines`, the
``METHODS`` registry; :mod:`.full_kernel`, GPM / Adam-NSCL on whole kernels), the comparison runner
(:mod:`.bench`) and its plots (:mod:`.plots`), the scaling tables (:mod:`.scaling`) and the knowledge-intensity
study (:mod:`.study`). It imports the library; the library never imports it (``cskl`` dispatches to it).
"""
