-- The state database as stgs 0.1.0 (state schema version 1) wrote it: `.iterdump()` of the
-- stgs.db of a real daemon (commit eb187e4, simulated H100, CPU workers) after `tiny_mlp` and
-- `tiny_cnn` were registered over REST, profiled, planned and served. Its CREATE statements are
-- version 1's DDL as that release ran it. Never edit it: tests/test_store_migrations.py
-- upgrades it.
BEGIN TRANSACTION;
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO "events" VALUES(1,1.79664147694120836262e+09,'start','daemon start; node: [{''gpu'': 0, ''mig'': False, ''layout'': []}]','{"node": [{"gpu": 0, "layout": [], "mig": false}]}');
INSERT INTO "events" VALUES(2,1.79664147713409948345e+09,'register','model tiny_mlp: profiling','{"model": "tiny_mlp"}');
INSERT INTO "events" VALUES(3,1.79664147845669770241e+09,'profiled','tiny_mlp on H100-80GB: 5 rows','{"model": "tiny_mlp"}');
INSERT INTO "events" VALUES(4,1.79664147965482473372e+09,'apply','applied a stgs plan (register tiny_mlp): 1 started, 0 stopped, 0 kept in 1.06 s','{"changes": null, "reason": "register tiny_mlp"}');
INSERT INTO "events" VALUES(5,1.79664147988340759274e+09,'register','model tiny_cnn: profiling','{"model": "tiny_cnn"}');
INSERT INTO "events" VALUES(6,1.79664148163998603816e+09,'profiled','tiny_cnn on H100-80GB: 5 rows','{"model": "tiny_cnn"}');
INSERT INTO "events" VALUES(7,1.79664148297857832912e+09,'apply','applied a stgs plan (register tiny_cnn): 1 started, 1 stopped, 0 kept in 1.24 s','{"changes": {"gpus_disrupted": 0, "gpus_mode_changed": [], "models_moved": ["tiny_cnn"], "partitions_added": 1, "partitions_kept": 0, "partitions_removed": 1}, "reason": "register tiny_cnn"}');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema','1');
CREATE TABLE models (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
INSERT INTO "models" VALUES('tiny_mlp','{"dtype": "fp16", "inputs": [], "name": "tiny_mlp", "rate_rps": 2.0, "slo_ms": 5000.0, "source": "builtin:tiny_mlp"}','ready','serving',1.79664147713350272174e+09,1.79664147965448951719e+09);
INSERT INTO "models" VALUES('tiny_cnn','{"dtype": "fp16", "inputs": [], "name": "tiny_cnn", "rate_rps": 2.0, "slo_ms": 5000.0, "source": "builtin:tiny_cnn"}','ready','serving',1.7966414798828334808e+09,1.79664148297831273081e+09);
CREATE TABLE plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    role TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL
);
INSERT INTO "plans" VALUES(1,1.79664147859099292752e+09,'current','applying','register tiny_mlp','{"format": "stgs.plan/v1", "policy": "stgs", "feasible": true, "gpus_used": 1, "gpus": [{"index": 0, "sku": "H100-80GB", "mig": true, "mode": "mig+mps", "partitions": [{"kind": "mps", "mig_profile": "2g.20gb", "mig_start": 4, "mps_pct": 12, "sm_count": 2, "memory_mib": 2411.5, "duty_cycle_ms": 779.3044, "models": [{"name": "tiny_mlp", "batch": 16, "rate_rps": 2.0, "latency_ms": 1.3926}]}]}], "unserved": [], "info": {"spare_factor": 8.0, "spare": "fill", "solve_ms": 17.416}}');
INSERT INTO "plans" VALUES(2,1.79664147965333509445e+09,'current','ready','register tiny_mlp','{"format": "stgs.plan/v1", "policy": "stgs", "feasible": true, "gpus_used": 1, "gpus": [{"index": 0, "sku": "H100-80GB", "mig": true, "mode": "mig+mps", "partitions": [{"kind": "mps", "mig_profile": "2g.20gb", "mig_start": 4, "mps_pct": 12, "sm_count": 2, "memory_mib": 2411.5, "duty_cycle_ms": 779.3044, "models": [{"name": "tiny_mlp", "batch": 16, "rate_rps": 2.0, "latency_ms": 1.3926}]}]}], "unserved": [], "info": {"spare_factor": 8.0, "spare": "fill", "solve_ms": 17.416}}');
INSERT INTO "plans" VALUES(3,1.79664147965399193765e+09,'last_good','ready','register tiny_mlp','{"format": "stgs.plan/v1", "policy": "stgs", "feasible": true, "gpus_used": 1, "gpus": [{"index": 0, "sku": "H100-80GB", "mig": true, "mode": "mig+mps", "partitions": [{"kind": "mps", "mig_profile": "2g.20gb", "mig_start": 4, "mps_pct": 12, "sm_count": 2, "memory_mib": 2411.5, "duty_cycle_ms": 779.3044, "models": [{"name": "tiny_mlp", "batch": 16, "rate_rps": 2.0, "latency_ms": 1.3926}]}]}], "unserved": [], "info": {"spare_factor": 8.0, "spare": "fill", "solve_ms": 17.416}}');
INSERT INTO "plans" VALUES(4,1.79664148173790621763e+09,'current','applying','register tiny_cnn','{"format": "stgs.plan/v1", "policy": "stgs", "feasible": true, "gpus_used": 1, "gpus": [{"index": 0, "sku": "H100-80GB", "mig": true, "mode": "mig+mps", "partitions": [{"kind": "mps", "mig_profile": "2g.20gb", "mig_start": 4, "mps_pct": 12, "sm_count": 2, "memory_mib": 2411.5, "duty_cycle_ms": 779.3044, "models": [{"name": "tiny_cnn", "batch": 16, "rate_rps": 2.0, "latency_ms": 44.0484}, {"name": "tiny_mlp", "batch": 16, "rate_rps": 2.0, "latency_ms": 1.3926}]}]}], "unserved": [], "info": {"spare_factor": 8.0, "spare": "fill", "changes": {"partitions_added": 1, "partitions_removed": 1, "partitions_kept": 0, "models_moved": ["tiny_cnn"], "gpus_mode_changed": [], "gpus_disrupted": 0}, "solve_ms": 20.987}}');
INSERT INTO "plans" VALUES(5,1.79664148297732758526e+09,'current','ready','register tiny_cnn','{"format": "stgs.plan/v1", "policy": "stgs", "feasible": true, "gpus_used": 1, "gpus": [{"index": 0, "sku": "H100-80GB", "mig": true, "mode": "mig+mps", "partitions": [{"kind": "mps", "mig_profile": "2g.20gb", "mig_start": 4, "mps_pct": 12, "sm_count": 2, "memory_mib": 2411.5, "duty_cycle_ms": 779.3044, "models": [{"name": "tiny_cnn", "batch": 16, "rate_rps": 2.0, "latency_ms": 44.0484}, {"name": "tiny_mlp", "batch": 16, "rate_rps": 2.0, "latency_ms": 1.3926}]}]}], "unserved": [], "info": {"spare_factor": 8.0, "spare": "fill", "changes": {"partitions_added": 1, "partitions_removed": 1, "partitions_kept": 0, "models_moved": ["tiny_cnn"], "gpus_mode_changed": [], "gpus_disrupted": 0}, "solve_ms": 20.987}}');
INSERT INTO "plans" VALUES(6,1.79664148297790122032e+09,'last_good','ready','register tiny_cnn','{"format": "stgs.plan/v1", "policy": "stgs", "feasible": true, "gpus_used": 1, "gpus": [{"index": 0, "sku": "H100-80GB", "mig": true, "mode": "mig+mps", "partitions": [{"kind": "mps", "mig_profile": "2g.20gb", "mig_start": 4, "mps_pct": 12, "sm_count": 2, "memory_mib": 2411.5, "duty_cycle_ms": 779.3044, "models": [{"name": "tiny_cnn", "batch": 16, "rate_rps": 2.0, "latency_ms": 44.0484}, {"name": "tiny_mlp", "batch": 16, "rate_rps": 2.0, "latency_ms": 1.3926}]}]}], "unserved": [], "info": {"spare_factor": 8.0, "spare": "fill", "changes": {"partitions_added": 1, "partitions_removed": 1, "partitions_kept": 0, "models_moved": ["tiny_cnn"], "gpus_mode_changed": [], "gpus_disrupted": 0}, "solve_ms": 20.987}}');
CREATE TABLE profiles (
    gpu TEXT NOT NULL,
    model TEXT NOT NULL,
    partition TEXT NOT NULL,
    sm_count INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    memory_mib REAL NOT NULL,
    PRIMARY KEY (gpu, model, partition, batch)
);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_mlp','full',132,1,0.0171,0.037);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_mlp','full',132,2,0.0199,0.037);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_mlp','full',132,4,0.0194,0.038);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_mlp','full',132,8,0.0203,0.039);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_mlp','full',132,16,0.0211,0.041);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_cnn','full',132,1,0.1088,0.018);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_cnn','full',132,2,0.2184,0.029);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_cnn','full',132,4,0.3056,0.053);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_cnn','full',132,8,0.4139,0.1);
INSERT INTO "profiles" VALUES('H100-80GB','tiny_cnn','full',132,16,0.6674,0.193);
CREATE INDEX plans_role ON plans (role, id);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('events',7);
INSERT INTO "sqlite_sequence" VALUES('plans',6);
COMMIT;
