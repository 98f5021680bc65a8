"""Task families: where episodes come from.

A task family (``OmniglotTasks``, ``SinusoidTasks``) is built from the
``dataset`` config node and hands out one episode sampler per split
(``train``, ``val``, ``test``) for a given way/shot/query.
"""
