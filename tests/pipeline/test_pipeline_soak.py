"""The whole-pipeline convergence run (tests/pipeline/pipeline_soak.py): a short variant in every
run, the full one (more rounds and faults, 10,000 offline edits, three seeds, or those of
``FIELDSYNC_SOAK_SEEDS``) marked slow (``python3 dev.py soak``).  ``FIELDSYNC_SOAK_SEED``
runs the short variant with another seed.  Each prints the faults injected, the
divergences found and the settle time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.cdc.test_cdc_crash import soak_seeds
from tests.pipeline.pipeline_soak import FAULT_KINDS, Soak, SoakPlan

SHORT_SEED = int(os.environ.get("FIELDSYNC_SOAK_SEED", "1010"))
FULL_SEEDS = soak_seeds() if "FIELDSYNC_SOAK_SEEDS" in os.environ else [2024, 31337, 8086]


def soak(
    plan: SoakPlan,
    pg_server: Any,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def log(line: str) -> None:
        with capsys.disabled():
            print(line, flush=True)

    result = Soak(
        plan,
        pg_server=pg_server,
        pg_dsn=pg_dsn,
        store_dsn=store_dsn,
        bootstrap=kafka_bootstrap,
        prefix=topic_prefix,
        tmp_path=tmp_path,
        log=log,
    ).run()
    log("\n" + result.report())
    assert result.divergences == [], result.report()
    assert result.settle_s is not None
    missing = [kind for kind in FAULT_KINDS if result.count(kind) == 0]
    assert not missing, f"fault kinds never injected: {missing}\n{result.report()}"


@pytest.mark.timeout(900)
def test_pipeline_converges_under_faults(
    pg_server: Any,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    soak(
        SoakPlan.short(SHORT_SEED),
        pg_server,
        pg_dsn,
        store_dsn,
        kafka_bootstrap,
        topic_prefix,
        tmp_path,
        capsys,
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", FULL_SEEDS)
def test_pipeline_converges_under_faults_full(
    seed: int,
    pg_server: Any,
    pg_dsn: str,
    store_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    soak(
        SoakPlan.full(seed),
        pg_server,
        pg_dsn,
        store_dsn,
        kafka_bootstrap,
        topic_prefix,
        tmp_path,
        capsys,
    )
