"""The daemon (REST + KServe v2, controller, metrics, store) and the ``stgs`` command."""
