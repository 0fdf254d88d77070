"""The daemon's service, one role a module; :class:`api.service.Service` composes them.

* :mod:`~api.roles.node`: the GPUs as the planner sees them, the node view (``GET /v1/gpus``);
* :mod:`~api.roles.profiles`: the profile tables and background profiling (the profiler's
  adapters are :mod:`profiler.adapters`);
* :mod:`~api.roles.planning`: plans (in planner processes, off the lock), apply, re-plan; the
  one lock every plan decision and transition takes (:class:`~api.roles.planning.Planning`);
* :mod:`~api.roles.registration`: registration, admission control, deletion, model entries;
* :mod:`~api.roles.loading`: the model repository's load, unload and index (Triton's);
* :mod:`~api.roles.serving`: inference through the runtime's workers, counted against the SLO.

Each role keeps its own state and takes the roles it uses as constructor arguments; only the
facade (:mod:`api.service`) builds them. The HTTP layer imports the facade, never a role
(import-linter).
"""
