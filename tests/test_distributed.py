"""Multi-host support: settings, row order across processes, and a real two-process run.

The end-to-end test starts ``python -m msad_jax.main`` three times on the smoke config: once as a
single process with two fake CPU devices, and once as two processes with one CPU device each,
joined by ``jax.distributed`` (Gloo collectives on CPU). Both see the same global batches on two
devices in the same order, so the two-process run must end with the same parameters, losses and
ROC-AUC as the single-process run (the oracle).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from msad_jax import distributed
from msad_jax.checkpointing import RunCheckpoints
from msad_jax.data.pipeline import eval_batches
from msad_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
ENV_NAMES = (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_come_from_arguments_then_environment(clean_env):
    assert distributed.resolve_settings() == (None, None, None)
    clean_env.setenv(distributed.COORDINATOR_ENV, "10.0.0.1:1234")
    clean_env.setenv(distributed.NUM_PROCESSES_ENV, "4")
    clean_env.setenv(distributed.PROCESS_ID_ENV, "3")
    assert distributed.resolve_settings() == ("10.0.0.1:1234", 4, 3)
    assert distributed.resolve_settings("h:1", 2, 0) == ("h:1", 2, 0)


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (("host", 2, 0), {}, "needs a port"),
        (("h:1", 2, 2), {}, "process_id=2 must lie in [0, num_processes=2)"),
        (("h:1", 0, 0), {}, "num_processes=0 must be >= 1"),
        ((None, None, None), {distributed.NUM_PROCESSES_ENV: "two"}, "must be an integer"),
    ],
)
def test_impossible_settings_are_named(clean_env, args, env, fragment):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError) as err:
        distributed.resolve_settings(*args)
    assert fragment in str(err.value)


def test_nothing_set_means_a_single_process_run(clean_env):
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert jax.process_count() == 1 and distributed.is_main_process()


def test_partial_settings_name_what_is_missing(clean_env):
    with pytest.raises(ValueError, match="num_processes, process_id not given"):
        distributed.initialize("localhost:1234")


@pytest.mark.parametrize(("n", "batch", "devices", "processes"), [(23, 8, 2, 2), (50, 12, 2, 3)])
def test_interleaving_the_processes_slices_restores_input_order(n, batch, devices, processes):
    # Each process's eval batches hold its slice of every global batch; gathering them (here by
    # stacking, as process_allgather does) and interleaving must give back the input order.
    index_images = np.arange(n).reshape(n, 1, 1, 1) * np.ones((1, 1, 1, 3), np.int64)
    per_process, masks = [], []
    for p in range(processes):
        batches = list(
            eval_batches(
                index_images,
                global_batch_size=batch,
                num_devices=devices,
                process_index=p,
                process_count=processes,
            )
        )
        per_process.append(np.stack([b["image"][..., 0, 0, 0].reshape(-1) for b in batches]))
        masks.append(np.stack([b["mask"].reshape(-1) for b in batches]))
    got = distributed.interleave_rows(np.stack(per_process), np.stack(masks))
    np.testing.assert_array_equal(got, np.arange(n))


def test_gather_rows_of_one_process_is_the_masked_concatenation():
    values = np.arange(24, dtype=np.float32).reshape(3, 4, 2)
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(distributed.gather_rows(values, mask), values[mask])


def test_mismatched_rows_and_mask_are_rejected():
    with pytest.raises(ValueError, match="disagree"):
        distributed.interleave_rows(np.zeros((2, 3, 4, 5)), np.ones((2, 3, 5), bool))


# --------------------------------------------------------------------------------------------
# Two processes vs one process with two devices, end to end.

OVERRIDES = (
    "--config.progress=False",
    "--config.plots=False",
    "--config.epochs=1",
    "--config.synthetic_train=64",
    "--config.synthetic_test=10",
    "--config.batch_size=16",
    "--config.eval_batch_size=32",
    "--config.checkpoint_every_steps=2",
)
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _main_command(workdir, *extra):
    return [
        sys.executable, "-m", "msad_jax.main", "--config", SMOKE, "--workdir", str(workdir),
        *OVERRIDES, *extra,
    ]  # fmt: skip


def _run_one_process_two_devices(workdir):
    proc = subprocess.run(
        _main_command(workdir),
        cwd=ROOT,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run_two_processes(workdir, tmp_path):
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        log = open(tmp_path / f"process_{pid}.log", "w+")  # noqa: SIM115 -- closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                _main_command(
                    workdir,
                    f"--coordinator_address=localhost:{port}",
                    "--num_processes=2",
                    f"--process_id={pid}",
                ),
                cwd=ROOT,
                env=_env(1),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        codes = [proc.wait(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return outputs


@pytest.mark.slow
def test_two_processes_give_the_result_of_one_process_with_two_devices(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run_one_process_two_devices(single)
    outputs = _run_two_processes(multi, tmp_path)
    assert "done: ROC-AUC" in outputs[0]
    assert "done: ROC-AUC" not in outputs[1]  # process 1 reports nothing

    report_1 = json.loads((single / "report.json").read_text())
    report_2 = json.loads((multi / "report.json").read_text())
    assert report_2["counts"] == report_1["counts"] == {
        "train": 64, "test": 100, "test_normal": 10, "test_anomalous": 90,
    }  # fmt: skip
    for key in ("auroc", "average_precision", "fpr_at_95_tpr"):
        np.testing.assert_allclose(report_2["final"][key], report_1["final"][key], rtol=1e-6)
        np.testing.assert_allclose(
            report_2["pretrained"][key], report_1["pretrained"][key], rtol=1e-6
        )

    # Per-step losses: written once (by process 0), equal to the single-process ones.
    steps_1 = [r for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    steps_2 = [r for r in read_metrics(multi / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps_2] == [r["step"] for r in steps_1] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [r["loss"] for r in steps_2], [r["loss"] for r in steps_1], rtol=1e-5
    )

    # Checkpoints written jointly by both processes hold the single-process state.
    a = RunCheckpoints(single / "checkpoints").restore_arrays()
    b = RunCheckpoints(multi / "checkpoints").restore_arrays()
    assert int(a["step"]) == int(b["step"]) == 4
    for name in ("params", "opt_state", "center"):
        for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=name)

    # The kNN gallery combined across processes is the single-process gallery, in input order.
    gallery_1 = np.load(single / "detector.npz")["gallery"]
    gallery_2 = np.load(multi / "detector.npz")["gallery"]
    assert gallery_2.shape == gallery_1.shape == (64, 64)
    np.testing.assert_allclose(gallery_2, gallery_1, rtol=1e-5, atol=1e-6)
