"""Shared fixtures: tiny random models saved in the formats of the real pretrained ones.

The real autoencoders and text encoders cannot be downloaded here, so the loading code is tested
with small random networks written to disk exactly as the real ones are distributed (a diffusers
folder, an OpenCLIP checkpoint, transformers folders). Every fixture is session-scoped: build once,
treat as read-only (copy a folder with `shutil.copytree` before adding files to it).

Text-encoder fixtures return a `TinyTextEncoder`; pass its `name` to
`micro_diffusion.encoders.text.load_text_encoder` and expect states of shape (B, max_length, width).
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import pytest
import torch

# Offline first: set before any test module imports huggingface_hub (which reads these once), so a
# missing model fails at once instead of retrying the network for minutes. The heavy libraries
# are therefore imported inside the fixtures below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tests run tiny models: one intra-op thread is as fast as two on them, and it keeps parallel test
# processes (the 2-process launcher tests) from oversubscribing a 2-core CI machine.
torch.set_num_threads(1)

TINY_OPENCLIP_ARCH = "md-tiny-clip"
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_T5_WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "road"]
Model = TypeVar("Model")


class TinyTextEncoder(NamedTuple):
    """A tiny text encoder on disk: `name` for load_text_encoder, `path` of its file or folder, its format."""

    name: str
    path: Path
    max_length: int
    width: int


def _seeded(build: Callable[[], Model]) -> Model:
    """build() with seed 0, leaving the global RNG state the tests see untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers AutoencoderKL folder (`save_pretrained`): 3 -> 4 latent channels, downsample factor 4.

    Its config sets scaling_factor 0.5 and shift_factor 0.25, so normalisation is visible in tests.
    """
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    vae = _seeded(lambda: AutoencoderKL(**config))
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_openclip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyTextEncoder:
    """A tiny OpenCLIP CLIP (both towers, width 32, 77 tokens) saved as `open_clip_model.safetensors`.

    The architecture is registered with open_clip as TINY_OPENCLIP_ARCH, so the name
    "openclip:md-tiny-clip:<checkpoint>" works; the folder also holds `open_clip_config.json`, so
    "openclip:local-dir:<folder>" (the hub layout) works too.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_openclip")
    arch_file = folder / f"{TINY_OPENCLIP_ARCH}.json"
    arch_file.write_text(json.dumps(TINY_OPENCLIP_CONFIG))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENCLIP_CONFIG}))
    open_clip.add_model_config(arch_file)
    clip_model = _seeded(lambda: open_clip.CLIP(**TINY_OPENCLIP_CONFIG))
    checkpoint = folder / "open_clip_model.safetensors"
    save_file(clip_model.state_dict(), str(checkpoint))
    text_cfg = TINY_OPENCLIP_CONFIG["text_cfg"]
    name = f"openclip:{TINY_OPENCLIP_ARCH}:{checkpoint}"
    return TinyTextEncoder(name, checkpoint, text_cfg["context_length"], text_cfg["width"])


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyTextEncoder:
    """A transformers CLIPTextModel folder (width 32, 77 positions, CLIP vocabulary) with NO tokenizer files.

    Loading it builds the CLIP tokenizer offline from open_clip's bundled BPE.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    folder = tmp_path_factory.mktemp("tiny_hf_clip")
    _seeded(lambda: CLIPTextModel(config)).save_pretrained(folder)
    return TinyTextEncoder(f"hf-clip:{folder}", folder, 77, 32)


def _tiny_t5_tokenizer():
    """A word-level fast tokenizer with T5's special tokens (<pad> 0, </s> 1, <unk> 2), closing with </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(TINY_T5_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyTextEncoder:
    """A transformers T5EncoderModel folder (d_model 32) with a word-level tokenizer (tokenizer.json).

    Its vocabulary is TINY_T5_WORDS; other words map to <unk>.
    """
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tiny_t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    folder = tmp_path_factory.mktemp("tiny_t5")
    _seeded(lambda: T5EncoderModel(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyTextEncoder(f"t5:{folder}", folder, 120, 32)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception-v3 with random weights (He-initialised, so activations stay normal floats),
    saved with torch.save under the real file's name, as the real weights file is. 91 MiB."""
    from unittest import mock

    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

    network_class = fidelity_inception.FeatureExtractorInceptionV3
    with (
        mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(network_class, "load_state_dict"),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(0)
        network = network_class("inception-v3-compat", ["2048"])
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path
