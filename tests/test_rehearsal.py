"""A dress rehearsal of the 8-GPU MicroDiT_XL_2 run, shrunk to two CPU processes (issue 16).

The README's multi-stage command, `python scripts/train_pipeline.py yamls/microdit_xl2.yaml`, runs the four real
stage configs (res_256_pretrain, res_256_finetune, res_512_pretrain, res_512_finetune) under `composer -n 2`,
with everything the XL recipe configures: its stream layout (five training sets at 256 px, four at 512 px, COCO for
evaluation), dataloader workers, the stage chaining (full state, then weights only with a new position table,
then full state with the EMA), the callbacks of configs/base/microdit_xl2.yaml (throughput, lr_monitor,
runtime_estimator, optimizer_monitor, nan_guard, image_grid), the 512-px stages' EMA, plus `sample_quality` and
`power_ema`, and the TensorBoard logger, whose event files are read back with TensorBoard's own reader.

Changed only where size or the machine forces it (the command-line overrides below):

- a tiny network (MicroDiT_XXS_2), a tiny diffusers AutoencoderKL (downsampling 4) and a tiny OpenCLIP text
  tower, saved in their real formats (tests/conftest.py); 8x8 latents at "256 px" and 16x16 at "512 px", so the
  512-px stages keep the 2x position interpolation and the pretrain -> 512 position-table swap; global batch 8;
  a few batches per stage, checkpoints and evaluations every 2 batches, 2 sampling steps, 4 quality samples;
- CPU instead of GPU: fp32 instead of amp_bf16 (Composer trains only fp32 on CPU), hence no low-precision
  LayerNorm; no torch.compile; no pinned memory; and DDP over gloo instead of the stages' FSDP
  (`trainer.fsdp_config=null`): Composer 0.32 runs FSDP only on CUDA devices, and the config check refuses
  fsdp_config without trainer.device gpu. DDP over gloo is the closest path that runs here; the FSDP code paths
  of the callbacks (EMA gather, sample_quality on all ranks) are exercised where a GPU is available.

Along the way one rank of stage 1 is killed with SIGKILL after a checkpoint; the launcher tears the other rank
down and the pipeline fails. Rerunning the same pipeline command resumes stage 1 from its last checkpoint, with the
per-batch losses and the final weights and optimiser state of an uninterrupted run of the same stage command, and
goes on through stages 2-4. The final EMA is then exported with `micro-diffusion export` and sampled with
`micro-diffusion generate`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_runs import REPO, load_state, run_command, subprocess_env, trained_batches, write_latent_shards

from micro_diffusion import cli
from micro_diffusion import pipeline as train_pipeline

# Six launches of `composer -n 2` in one fixture: about 4 minutes on 2 idle cores, more than the suite's per-test
# limit (900 s) on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PIPELINE_FILE = REPO / "yamls" / "microdit_xl2.yaml"
STAGES = ("res_256_pretrain", "res_256_finetune", "res_512_pretrain", "res_512_finetune")
# The batch counter at the end of each stage: stages 2 and 4 continue the counter of the stage before them.
FINAL_BATCH = {"res_256_pretrain": 6, "res_256_finetune": 8, "res_512_pretrain": 3, "res_512_finetune": 5}
IMAGE_SIZE = {"res_256": 32, "res_512": 64}  # pixels; the tiny autoencoder downsamples 4x
VAE_DOWNSAMPLE = 4
SAMPLES_PER_STREAM = 16
LOSS = "loss/train/total"
TOLERANCE = 1e-6


def stage_arguments(vae_dir: Path, text_encoder_dir: Path, datadir: Path) -> list[str]:
    """The pipeline's command-line arguments: overrides for every stage, then `STAGE:override` for one stage."""
    quality = ("{prompts:shapes,num_samples:4,batch_size:4,steps:2,guidance:2.0,reference_source:shapes,"
               "reference_options:{num_samples:8},reference_count:8,cache_dir:'${trainer.save_folder}/eval_cache'}")
    common = [
        f"data.datadir={datadir}", f"model.vae_name={vae_dir}", f"model.text_encoder_name=openclip:local-dir:"
        f"{text_encoder_dir}", "model.dit_arch=MicroDiT_XXS_2", "data.train_batch_size=8", "data.eval_batch_size=8",
        "trainer.eval_subset_num_batches=1", "trainer.eval_interval=2ba", "trainer.save_interval=2ba",
        "callbacks.image_grid.num_inference_steps=2", "trainer.progress_bar=false",
        "callbacks.throughput.window_size=1", "callbacks.throughput.log_interval=1",
        "+callbacks.optimizer_monitor.batch_log_interval=2",
        # the machine: CPU, gloo
        "trainer.device=cpu", "trainer.precision=fp32", "algorithms.low_precision_layernorm=false",
        "trainer.compile=false", "data.pin_memory=false", "trainer.fsdp_config=null",
        # the callbacks the rehearsal adds to the recipe
        f"+callbacks.sample_quality={quality}",
        "+callbacks.power_ema={snapshot_interval_images:16,folder:'${trainer.save_folder}/phema'}",
    ]
    per_stage = []
    for stage in STAGES:
        resolution = stage[:7]
        per_stage += [
            f"{stage}:data.image_size={IMAGE_SIZE[resolution]}",
            f"{stage}:model.latent_res={IMAGE_SIZE[resolution] // VAE_DOWNSAMPLE}",
            f"{stage}:trainer.max_duration={FINAL_BATCH[stage]}ba",
        ]
    # The 512-px EMAs start at batches 25000 and 1000: start them within the few batches run here.
    per_stage += ["res_512_pretrain:callbacks.ema.ema_start=2ba", "res_512_finetune:callbacks.ema.ema_start=2ba"]
    return common + per_stage


def stream_folders(arguments: list[str]) -> set[str]:
    """Every training and evaluation stream of the four stages, as the configs name them."""
    pipeline = train_pipeline.load_pipeline(PIPELINE_FILE, arguments, nproc=2)
    streams = set()
    for stage in pipeline.training_stages:
        data = train_pipeline.compose_stage(pipeline.config_dir, stage).data
        streams.update(data.train_streams, data.eval_streams)
    return streams


def scalars(folder: Path, tag: str) -> dict[int, tuple[float, float]]:
    """{step: (wall time, value)} of a scalar in the TensorBoard event files of `folder`, read by TensorBoard's own
    reader (which drops the events a restarted run logs again)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: (event.wall_time, event.value) for event in events.Scalars(tag)}


def event_tags(folder: Path) -> dict[str, list[str]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events.Tags()


def kill_one_rank_after_a_checkpoint(command: list[str], cwd: Path, checkpoint: Path) -> int:
    """Start `command` (the pipeline), SIGKILL the rank-1 worker of its training stage once `checkpoint` is
    written, and wait until the pipeline and every process it started have exited. Returns the pipeline's exit
    code."""
    runner = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not checkpoint.exists():  # a checkpoint is complete once the "latest" link points to it
            assert runner.poll() is None, "the pipeline ended before stage 1 wrote its first checkpoint"
            time.sleep(0.05)
        processes = psutil.Process(runner.pid).children(recursive=True)
        [launcher] = [p for p in processes if "composer.cli" in p.cmdline()]
        [rank_1] = [p for p in launcher.children() if p.environ().get("RANK") == "1"]  # not its dataloader workers
        rank_1.send_signal(signal.SIGKILL)
        returncode = runner.wait(timeout=300)
        _, alive = psutil.wait_procs(processes, timeout=60)
        assert not alive, f"processes outlived the pipeline: {[p.cmdline() for p in alive]}"
        return returncode
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, tiny_vae_dir, tiny_openclip_checkpoint) -> dict:
    """Runs everything once: an uninterrupted stage 1 for reference, the pipeline killed in stage 1, the pipeline
    rerun to the end. Returns the folders, the stage-1 checkpoint the kill left, and when the kill happened."""
    root = tmp_path_factory.mktemp("rehearsal")
    arguments = stage_arguments(tiny_vae_dir, tiny_openclip_checkpoint.path.parent, root / "datadir")
    caption_shape = (tiny_openclip_checkpoint.max_length, tiny_openclip_checkpoint.width)
    for seed, stream in enumerate(sorted(stream_folders(arguments))):
        write_latent_shards(root / "datadir" / stream, SAMPLES_PER_STREAM, seed, caption_shape,
                            tuple(IMAGE_SIZE.values()), channels=4, downsample=VAE_DOWNSAMPLE)
    pipeline = train_pipeline.load_pipeline(PIPELINE_FILE, arguments, nproc=2)
    configs = {stage.config: train_pipeline.compose_stage(pipeline.config_dir, stage) for stage in
               pipeline.training_stages}
    folders = {name: root / config.trainer.save_folder for name, config in configs.items()}
    event_folders = {name: folders[name] / "tensorboard" / config.exp_name for name, config in configs.items()}

    first = pipeline.training_stages[0]
    reference = root / "reference"
    run_command([*train_pipeline.launch_command(pipeline, first), f"trainer.save_folder={reference}"], root)

    command = [sys.executable, str(REPO / "scripts" / "train_pipeline.py"), str(PIPELINE_FILE), "--nproc", "2",
               *arguments]
    latest = folders[first.config] / train_pipeline.FINAL_CHECKPOINT
    returncode = kill_one_rank_after_a_checkpoint(command, root, latest)
    killed_at = time.time()
    assert returncode != 0, "the pipeline reported success after one of its ranks was killed"
    assert not (folders[first.config] / train_pipeline.DONE_MARKER).exists()
    resumed_from = trained_batches(load_state(latest))

    output = run_command(command, root)
    return dict(root=root, folders=folders, event_folders=event_folders, reference=reference,
                resumed_from=resumed_from, killed_at=killed_at, output=output)


def test_a_killed_stage_resumes_to_the_uninterrupted_run(rehearsal):
    """The rerun resumed stage 1 at its last checkpoint, drew the same batches and noise (same per-batch losses)
    and ended with the uninterrupted run's weights and Adam moments."""
    folder, reference, resumed_from = rehearsal["folders"]["res_256_pretrain"], rehearsal["reference"], \
        rehearsal["resumed_from"]
    assert 0 < resumed_from < FINAL_BATCH["res_256_pretrain"]
    assert "stage 1/4 (res_256_pretrain): resuming" in rehearsal["output"]

    events = rehearsal["event_folders"]["res_256_pretrain"]
    losses = scalars(events, LOSS)
    expected = scalars(reference / events.relative_to(folder), LOSS)
    assert sorted(expected) == list(range(FINAL_BATCH["res_256_pretrain"]))
    assert sorted(losses) == sorted(expected), "the event files hold every batch once, across the kill"
    after_kill = sorted(step for step, (wall_time, _) in losses.items() if wall_time > rehearsal["killed_at"])
    assert after_kill == list(range(resumed_from, FINAL_BATCH["res_256_pretrain"])), "resumed at the checkpoint"
    for step in after_kill:
        assert losses[step][1] == pytest.approx(expected[step][1], rel=1e-5), f"loss of batch {step}"

    resumed = load_state(folder / train_pipeline.FINAL_CHECKPOINT)
    uninterrupted = load_state(reference / train_pipeline.FINAL_CHECKPOINT)
    assert trained_batches(resumed) == FINAL_BATCH["res_256_pretrain"]
    for key, weight in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], weight, rtol=0, atol=TOLERANCE, msg=key)
    moments = uninterrupted["optimizers"]["AdamW"]["state"]
    for name, state in resumed["optimizers"]["AdamW"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[moment], moments[name][moment], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_checkpoints_and_logs(rehearsal, stage):
    """Each stage ran to its batch, saved checkpoints without the frozen encoders, and its callbacks and the
    TensorBoard logger did their work: losses, learning rates, gradient norms, throughput, the validation loss,
    sample quality and image grids in the event files, PNG grids and power-EMA snapshots on disk."""
    folder = rehearsal["folders"][stage]
    assert (folder / train_pipeline.DONE_MARKER).exists() and (folder / train_pipeline.STAGE_CONFIG).exists()
    state = load_state(folder / train_pipeline.FINAL_CHECKPOINT)
    assert trained_batches(state) == FINAL_BATCH[stage]
    assert not [key for key in state["model"] if not key.startswith(("dit.", "label_embedder."))]
    assert ("EMA" in state["callbacks"]) == stage.startswith("res_512")

    tags = event_tags(rehearsal["event_folders"][stage])
    logged = set(tags["scalars"])
    for tag in (LOSS, "metrics/eval/ValidationLoss", "throughput/images_per_sec", "l2_norm/grad/global",
                "time/remaining_estimate", "quality/shapes_all", "quality/fd_efficientnet-lite0"):
        assert tag in logged, f"{tag} was not logged"
    assert any(tag.startswith("lr-") for tag in logged)
    assert "image_grid" in " ".join(tags["images"])
    assert np.isfinite(scalars(rehearsal["event_folders"][stage], LOSS)[FINAL_BATCH[stage] - 1][1])
    assert sorted((folder / "images").glob("grid_ba*.png"))
    assert sorted((folder / "phema").glob("phema-*.safetensors"))


def test_the_final_ema_exports_and_generates(rehearsal):
    """`micro-diffusion export` writes stage 4's EMA as a model folder; `micro-diffusion generate` samples from it
    with nothing but the folder."""
    folder, out = rehearsal["folders"]["res_512_finetune"], rehearsal["root"] / "exported"
    cli.main(["export", str(folder / train_pipeline.FINAL_CHECKPOINT), str(out), "--model-config",
              str(folder / train_pipeline.STAGE_CONFIG)])
    assert json.loads((out / "micro_diffusion.json").read_text())["weights"]["kind"] == "ema"
    grid = rehearsal["root"] / "grid.png"
    cli.main(["generate", "--weights", str(out), "--prompt", "a red circle", "--prompt", "a blue square",
              "--steps", "2", "--out", str(grid)])
    with Image.open(grid) as image:
        assert min(image.size) >= IMAGE_SIZE["res_512"]
