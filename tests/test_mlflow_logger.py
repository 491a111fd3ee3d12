"""MLflow end to end, offline: `composer -n 2 train.py` of the tiny recipe with `logger.mlflow` on a local file
store, read back with MLflow's own client: the loss at every step, the run's hyperparameters, and the image grids
of the `image_grid` callback as image artifacts.

Where the test runs as root with `unshare`, the run has no network at all (a namespace with only loopback), so
anything the logger tried to reach would fail the run.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from training_runs import composer_command, run_command, write_latent_shards

STEPS, GRID_EVERY = 4, 2

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow", reason="MLflow is in the test extra: pip install -e '.[test]'")


def offline(command: list[str]) -> list[str]:
    """`command` in a network namespace with only loopback up (Composer's launcher rendezvous on 127.0.0.1), when
    this process may create one; `command` unchanged otherwise."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return command
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return command
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command]


def test_mlflow_file_store_holds_the_loss_of_every_step_and_the_image_grids(tmp_path, tiny_hf_clip_dir):
    datadir = tmp_path / "latents"
    caption_shape = (tiny_hf_clip_dir.max_length, tiny_hf_clip_dir.width)
    write_latent_shards(datadir / "train", 48, seed=0, caption_shape=caption_shape)
    write_latent_shards(datadir / "val", 16, seed=1, caption_shape=caption_shape)
    tracking_uri = (tmp_path / "mlruns").as_uri()
    run_command(offline(composer_command(2, "tiny_res_16_pretrain", [
        "exp_name=tracked", f"data.datadir={datadir}", f"model.text_encoder_name={tiny_hf_clip_dir.name}",
        "data.train_batch_size=8", "data.eval_batch_size=16", "trainer.eval_subset_num_batches=1",
        "trainer.progress_bar=false", f"trainer.save_folder={tmp_path}/runs/tracked", f"trainer.max_duration={STEPS}ba",
        f"trainer.save_interval={GRID_EVERY}ba", f"trainer.eval_interval={STEPS}ba",
        "callbacks.image_grid.num_inference_steps=2", "logger.tensorboard=null",
        f"+logger.mlflow={{tracking_uri:'{tracking_uri}',experiment_name:microdit,log_system_metrics:false}}",
    ])), tmp_path)

    client = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("microdit")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_name"] == run.info.run_name, "one run, named after the Composer run"
    losses = client.get_metric_history(run.info.run_id, "loss/train/total")
    assert sorted(metric.step for metric in losses) == list(range(STEPS))
    assert all(metric.value > 0 for metric in losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "metrics/eval/ValidationLoss")] == [STEPS]
    assert run.data.params["rank_zero_seed"] == "18", "Composer's hyperparameters reach the run"

    # MLflow stores an image logged at step k as images/<key>%step%k%<timestamp>%<id>.png (and a webp preview).
    names = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "images")]
    grids = {int(re.search(r"%step%(\d+)%", name).group(1)): name for name in names
             if name.startswith("images/image_grid_0%") and name.endswith(".png")}
    assert sorted(grids) == list(range(GRID_EVERY, STEPS + 1, GRID_EVERY)), names
    logged = client.download_artifacts(run.info.run_id, grids[STEPS], str(tmp_path))
    saved = tmp_path / "runs" / "tracked" / "images" / f"grid_ba{STEPS:08d}.png"
    difference = np.asarray(Image.open(logged), np.int16) - np.asarray(Image.open(saved), np.int16)
    assert np.abs(difference).max() <= 1, "the logged grid is the saved one (up to rounding to 8 bits)"
