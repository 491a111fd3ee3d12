"""End to end on CPU with the tiny recipe on a small latent shard folder (batch 8, a few batches).

- `composer -n 2 train.py` (gloo) trains, evaluates, logs image grids and checkpoints.
- The same run killed with SIGKILL after its first checkpoint and restarted with the same command ends with the
  uninterrupted run's weights and optimiser state (tolerance 1e-6: same data order, same RNG streams, float32).
- Two launcher invocations on 127.0.0.1 with node ranks 0 and 1 (one process each, gloo) train exactly as one
  `composer -n 2` run does (tolerance 1e-6), and reach a single process's validation loss at the same global
  batch within 2% (the runs differ only in per-rank noise draws).
- scripts/train_pipeline.py chains two stages through the launcher; a weights-only start at a higher
  resolution loads every weight of the previous stage but the position table.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from training_runs import (
    REPO,
    composer_command,
    load_state,
    run_command,
    subprocess_env,
    trained_batches,
    write_latent_shards,
)

from micro_diffusion.models.layers import sincos_2d
from micro_diffusion.training.config import load_run_config
from micro_diffusion.training.tasks import TASKS

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the training script at the repository root)

STEPS, SAVE_EVERY, EVAL_EVERY = 8, 2, 4
TOLERANCE = 1e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latent_datadir(tmp_path_factory, tiny_hf_clip_dir) -> Path:
    root = tmp_path_factory.mktemp("latents")
    caption_shape = (tiny_hf_clip_dir.max_length, tiny_hf_clip_dir.width)
    write_latent_shards(root / "train", 96, seed=0, caption_shape=caption_shape)
    write_latent_shards(root / "val", 32, seed=1, caption_shape=caption_shape)
    return root


def tiny_overrides(datadir: Path, text_encoder: str, runs: Path) -> list[str]:
    """The tiny recipe at test size: batch 8, two-step image grids, one evaluation batch."""
    return [
        f"data.datadir={datadir}", f"model.text_encoder_name={text_encoder}", "data.train_batch_size=8",
        "data.eval_batch_size=16", "trainer.eval_subset_num_batches=1", "trainer.progress_bar=false",
        "callbacks.image_grid.num_inference_steps=2", f"trainer.save_folder={runs}/${{exp_name}}",
    ]


def metric_values(metrics_file: Path, name: str) -> dict[int, float]:
    """{batch: value} of a metric in Composer's FileLogger output."""
    pattern = re.compile(rf"\[metric\]\[batch=(\d+)\]: {re.escape(name)}: (\S+)")
    return {int(m.group(1)): float(m.group(2)) for m in pattern.finditer(metrics_file.read_text())}


def training_command(
    latent_datadir: Path, text_encoder: str, runs: Path, exp_name: str, nproc: int = 2, launcher: tuple[str, ...] = ()
) -> list[str]:
    return composer_command(nproc, "tiny_res_16_pretrain", [
        *tiny_overrides(latent_datadir, text_encoder, runs), f"exp_name={exp_name}",
        f"trainer.max_duration={STEPS}ba", f"trainer.save_interval={SAVE_EVERY}ba",
        f"trainer.eval_interval={EVAL_EVERY}ba", "trainer.autoresume=true",
    ], launcher)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, latent_datadir, tiny_hf_clip_dir) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("runs")
    output = run_command(training_command(latent_datadir, tiny_hf_clip_dir.name, runs, "uninterrupted"), runs)
    return runs / "uninterrupted", output


def test_composer_two_processes_train_evaluate_log_grids_and_checkpoint(uninterrupted_run):
    folder, output = uninterrupted_run
    assert "2 process(es)" in output
    checkpoint = torch.load(folder / "latest-rank0.pt", map_location="cpu", weights_only=False)
    assert trained_batches(checkpoint["state"]) == STEPS
    assert len(checkpoint["rng"]) == 2, "both ranks saved their RNG state"
    assert (folder / f"ep0-ba{STEPS}-rank0.pt").exists()
    assert sorted(p.name for p in (folder / "images").glob("*.png")) == [
        f"grid_ba{batch:08d}.png" for batch in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)
    ]
    metrics = folder / "metrics.txt"  # the file logger of the tiny recipe
    evaluated_at = sorted(metric_values(metrics, "metrics/eval/ValidationLoss"))
    assert evaluated_at == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    losses = metric_values(metrics, "loss/train/total")
    assert sorted(losses) == list(range(STEPS)) and all(np.isfinite(list(losses.values())))


def test_sigkill_and_autoresume_reach_the_uninterrupted_state(uninterrupted_run, latent_datadir, tiny_hf_clip_dir):
    reference_folder, _ = uninterrupted_run
    runs = reference_folder.parent
    command = training_command(latent_datadir, tiny_hf_clip_dir.name, runs, "killed")
    process = subprocess.Popen(
        command, cwd=runs, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = runs / "killed" / "latest-rank0.pt"
    try:
        while not latest.exists():  # the first checkpoint is complete once its "latest" link exists
            assert process.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = trained_batches(load_state(latest))
    assert killed_at < STEPS, "the run was killed before it finished"

    run_command(command, runs)

    # The file logger keeps the killed attempt's lines before the checkpoint and drops those after it.
    log = (runs / "killed" / "metrics.txt").read_text()
    logged_steps = [int(step) for step in re.findall(r"\[metric\]\[batch=(\d+)\]: loss/train/total: ", log)]
    assert sorted(logged_steps) == list(range(STEPS)), "each step logged once across the kill and the resume"
    resumed_losses = metric_values(runs / "killed" / "metrics.txt", "loss/train/total")
    reference_losses = metric_values(reference_folder / "metrics.txt", "loss/train/total")
    for batch, loss in resumed_losses.items():
        assert loss == pytest.approx(reference_losses[batch], abs=1e-4)  # logged with 4 decimals
    resumed = load_state(runs / "killed" / "latest-rank0.pt")
    reference = load_state(reference_folder / "latest-rank0.pt")
    assert trained_batches(resumed) == STEPS
    for key, weight in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], weight, rtol=0, atol=TOLERANCE, msg=key)
    reference_moments = reference["optimizers"]["AdamW"]["state"]
    for name, moments in resumed["optimizers"]["AdamW"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[moment], reference_moments[name][moment], rtol=0, atol=TOLERANCE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def own_shared_memory(command: list[str]) -> list[str]:
    """Run `command` with a private /dev/shm, as on a machine of its own: Streaming's local leaders coordinate
    through POSIX shared memory, and two "nodes" sharing one /dev/shm would claim the same names."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs shm /dev/shm && exec "$0" "$@"', *command]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a private /dev/shm per simulated node needs root and unshare")
def test_two_nodes_on_loopback_train_like_one_node(uninterrupted_run, latent_datadir, tiny_hf_clip_dir):
    """The multi-node launch of README ("Scale past one machine") with two 1-process "nodes" on 127.0.0.1.

    Same world size and ranks as the `composer -n 2` run, so the same data order and noise: the final weights
    must match it to 1e-6. A single process at the same global batch (8) reads the same samples per step but
    draws other noise, so only its final validation loss (fixed sigmas, fixed noise) is compared, within 2%.
    """
    reference_folder, _ = uninterrupted_run
    runs = reference_folder.parent
    port = str(free_port())

    def node_command(node_rank: int) -> list[str]:
        launcher = ("--world_size", "2", "--node_rank", str(node_rank), "--master_addr", "127.0.0.1",
                    "--master_port", port)
        command = training_command(latent_datadir, tiny_hf_clip_dir.name, runs, "two_nodes", 1, launcher)
        command += [
            "trainer.autoresume=false",  # autoresume needs a save folder per node (or a remote one)
            "+data.streaming.num_canonical_nodes=1",  # Streaming's default is the node count: keep one node's order
        ]
        return own_shared_memory(command) if node_rank else command

    nodes = [
        subprocess.Popen(node_command(node_rank), cwd=runs, env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for node_rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for node_rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {node_rank} failed:\n{output[-6000:]}"
    two_nodes = load_state(runs / "two_nodes" / "latest-rank0.pt")
    reference = load_state(reference_folder / "latest-rank0.pt")
    assert trained_batches(two_nodes) == STEPS
    for key, weight in reference["model"].items():
        torch.testing.assert_close(two_nodes["model"][key], weight, rtol=0, atol=TOLERANCE, msg=key)

    run_command(training_command(latent_datadir, tiny_hf_clip_dir.name, runs, "one_process", nproc=1), runs)
    validation = {
        name: metric_values(runs / name / "metrics.txt", "metrics/eval/ValidationLoss")[STEPS]
        for name in ("two_nodes", "one_process")
    }
    assert validation["two_nodes"] == pytest.approx(validation["one_process"], rel=0.02), validation


def test_pipeline_chains_a_full_state_continuation(tmp_path, latent_datadir, tiny_hf_clip_dir):
    """Two tiny stages through scripts/train_pipeline.py: the second continues the first's full state (step
    counter, Adam moments) with its own learning rate. Skipping and resuming: tests/test_train_pipeline.py."""
    runs = tmp_path / "runs"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "config_dir": str(REPO / "configs"),
        "nproc": 1,
        "overrides": [
            *tiny_overrides(latent_datadir, tiny_hf_clip_dir.name, runs), "callbacks.image_grid=null",
            "trainer.eval_interval=2ba", "trainer.save_interval=2ba",
        ],
        "stages": [
            {"config": "tiny_res_16_pretrain", "overrides": ["trainer.max_duration=4ba"]},
            {"config": "tiny_res_16_finetune", "overrides": ["trainer.max_duration=6ba"], "load_from_previous": True},
        ],
    }))
    run_command([sys.executable, str(REPO / "scripts" / "train_pipeline.py"), str(pipeline)], tmp_path)

    names = ["tiny_mask_75_res_16_pretrain", "tiny_mask_0_res_16_finetune"]
    first, second = (load_state(runs / name / "latest-rank0.pt") for name in names)
    assert [trained_batches(first), trained_batches(second)] == [4, 6]
    assert sorted(set(first["schedulers"]["LambdaLR"]["base_lrs"])) == pytest.approx([5e-4, 1e-3])
    assert sorted(set(second["schedulers"]["LambdaLR"]["base_lrs"])) == pytest.approx([1.65e-4, 3.3e-4])
    assert {float(m["step"]) for m in second["optimizers"]["AdamW"]["state"].values()} == {6.0}
    assert all((runs / name / "pipeline_stage_done.json").exists() for name in names)


def test_weights_only_start_at_a_higher_resolution(tmp_path, uninterrupted_run, tiny_hf_clip_dir, latent_datadir):
    """tiny_res_32_pretrain from a 16-px checkpoint (as stage 3 from stage 2): every weight loaded but the
    position table, which is the 32-px one; step counter and optimiser start afresh."""
    folder, _ = uninterrupted_run
    checkpoint = folder / "latest-rank0.pt"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="tiny_res_32_pretrain", overrides=[
            *tiny_overrides(latent_datadir, tiny_hf_clip_dir.name, tmp_path), f"trainer.load_path={checkpoint}",
        ])
    run = load_run_config(cfg)
    trainer = train.build_trainer(run, TASKS[run.task](run))
    loaded = load_state(checkpoint)["model"]
    model = trainer.state.model.state_dict()
    dit = trainer.state.model.dit
    assert int(trainer.state.timestamp.batch) == 0 and not trainer.state.optimizers[0].state
    assert loaded["dit.pos_embed"].shape[1] == 64
    torch.testing.assert_close(model["dit.pos_embed"], sincos_2d(16, 16, dit.dim, pos_interp_scale=2.0)[None])
    for key, weight in loaded.items():
        if key != "dit.pos_embed":
            torch.testing.assert_close(model[key], weight, rtol=0, atol=0, msg=key)
    trainer.close()
