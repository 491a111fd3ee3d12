"""Captions -> token states: OpenCLIP text tower, HF CLIP, T5 and MiniLM, the format table, bad input."""

import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, T5EncoderModel

from micro_diffusion.encoders.text import (
    KNOWN_TEXT_ENCODERS,
    OpenCLIPTextEncoder,
    TextEncoder,
    clip_tokenizer_from_open_clip_bpe,
    load_text_encoder,
    text_encoder_format,
)

CAPTIONS = ["a photo of a red cat", "the blue car on the road", ""]
LONG_CAPTION = "a photo of a cat " * 40


def _openclip_arch(spec) -> str:
    """The architecture part of an 'openclip:<arch>:<checkpoint>' name."""
    return spec.name.split(":")[1]


@pytest.fixture(scope="module")
def openclip_encoder(tiny_openclip_checkpoint) -> TextEncoder:
    return load_text_encoder(tiny_openclip_checkpoint.name, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def hf_clip_encoder(tiny_hf_clip_dir) -> TextEncoder:
    return load_text_encoder(tiny_hf_clip_dir.name)


@pytest.fixture(scope="module")
def t5_encoder(tiny_t5_dir) -> TextEncoder:
    return load_text_encoder(tiny_t5_dir.name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", (77, 1024)),
        ("stabilityai/stable-diffusion-2-base", (77, 1024)),
        ("runwayml/stable-diffusion-v1-5", (77, 768)),
        ("CompVis/stable-diffusion-v1-4", (77, 768)),
        ("DeepFloyd/t5-v1_1-xxl", (120, 4096)),
        ("minilm", (32, 384)),
        ("minilm-16", (16, 384)),
    ],
)
def test_format_table(name, expected):
    assert text_encoder_format(name) == expected
    assert name in KNOWN_TEXT_ENCODERS


def test_format_of_local_models_reads_only_the_config(tiny_openclip_checkpoint, tiny_hf_clip_dir, tiny_t5_dir):
    arch = _openclip_arch(tiny_openclip_checkpoint)
    assert text_encoder_format(f"openclip:{arch}:/weights/not/needed.safetensors") == (77, 32)
    assert text_encoder_format(f"openclip:local-dir:{tiny_openclip_checkpoint.path.parent}") == (77, 32)
    assert text_encoder_format(tiny_hf_clip_dir.name) == (77, 32)
    assert text_encoder_format(tiny_t5_dir.name) == (120, 32)


def test_openclip_keeps_only_the_text_tower(openclip_encoder, tiny_openclip_checkpoint):
    assert isinstance(openclip_encoder, OpenCLIPTextEncoder)
    names = set(openclip_encoder.state_dict())
    assert not any(name.startswith(("visual", "text_projection", "logit_scale")) for name in names)
    checkpoint_keys = set(load_file(tiny_openclip_checkpoint.path))
    text_tower_prefixes = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    assert names == {key for key in checkpoint_keys if key.startswith(text_tower_prefixes)}


def test_openclip_returns_all_token_states_in_the_requested_dtype(openclip_encoder, tiny_openclip_checkpoint):
    states, mask = openclip_encoder(CAPTIONS)
    assert states.shape == (3, 77, 32) and states.dtype == torch.bfloat16
    assert {p.dtype for p in openclip_encoder.parameters()} == {torch.bfloat16}
    assert mask.dtype == torch.long and mask.sum(dim=1).tolist() == [8, 8, 2]  # start + words + end


def test_openclip_states_match_open_clip_pooled_features(tiny_openclip_checkpoint):
    """The end-token state, projected, must equal open_clip's own encode_text: same tower, same weights."""
    encoder = load_text_encoder(tiny_openclip_checkpoint.name, dtype=torch.float32)
    arch = _openclip_arch(tiny_openclip_checkpoint)
    clip_model = open_clip.create_model(arch, pretrained=str(tiny_openclip_checkpoint.path)).eval()
    tokens = encoder.tokenize(CAPTIONS)
    states = encoder.encode(*tokens)
    end_positions = tokens.attention_mask.sum(dim=1) - 1
    pooled = states[torch.arange(3), end_positions] @ clip_model.text_projection
    with torch.no_grad():
        torch.testing.assert_close(pooled, clip_model.encode_text(tokens.input_ids))


def test_openclip_tokenizer_is_offline_and_truncates(openclip_encoder):
    tokens = openclip_encoder.tokenize(["a photo of a cat", LONG_CAPTION])
    assert tokens.input_ids.shape == (2, 77) and tokens.input_ids.dtype == torch.long
    assert torch.equal(tokens.input_ids, open_clip.tokenize(["a photo of a cat", LONG_CAPTION]))
    assert tokens.input_ids[1, -1].item() == 49407  # truncated, end token kept
    assert tokens.attention_mask[1].sum().item() == 77


def test_openclip_local_dir_layout_gives_the_same_states(openclip_encoder, tiny_openclip_checkpoint):
    folder_encoder = load_text_encoder(
        f"openclip:local-dir:{tiny_openclip_checkpoint.path.parent}", dtype=torch.bfloat16
    )
    torch.testing.assert_close(folder_encoder(CAPTIONS)[0], openclip_encoder(CAPTIONS)[0])


def test_clip_tokenizer_from_bundled_bpe_matches_open_clip():
    tokenizer = clip_tokenizer_from_open_clip_bpe()
    captions = ["A photo of a cat!", "naïve café, 1234 emoji-like :)", LONG_CAPTION]
    hf_ids = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    open_clip_ids = open_clip.tokenize(captions)
    real = hf_ids["attention_mask"].bool()
    assert torch.equal(hf_ids["input_ids"][real], open_clip_ids[real])
    assert torch.all(hf_ids["input_ids"][~real] == 49407)  # pads with <|endoftext|>, like OpenAI CLIP


def test_hf_clip_matches_the_model_run_directly(hf_clip_encoder, tiny_hf_clip_dir):
    states, mask = hf_clip_encoder(CAPTIONS)
    assert states.shape == (3, 77, 32) and states.dtype == torch.float32
    assert mask.sum(dim=1).tolist() == [8, 8, 2]
    model = CLIPTextModel.from_pretrained(tiny_hf_clip_dir.path).eval()
    with torch.no_grad():
        expected = model(input_ids=hf_clip_encoder.tokenize(CAPTIONS).input_ids).last_hidden_state
    torch.testing.assert_close(states, expected)


def test_hf_clip_uses_saved_tokenizer_files(hf_clip_encoder, tiny_hf_clip_dir, tmp_path):
    folder = shutil.copytree(tiny_hf_clip_dir.path, tmp_path / "clip")
    tokenizer = clip_tokenizer_from_open_clip_bpe()
    tokenizer.pad_token = "!"  # SD-2 style padding, to tell the saved tokenizer from the built one
    tokenizer.save_pretrained(folder)
    encoder = load_text_encoder(f"hf-clip:{folder}", dtype=torch.float16)
    ids = encoder.tokenize(["a cat"]).input_ids
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and ids[0, -1].item() == 0
    assert encoder(["a cat"])[0].dtype == torch.float16


def test_t5_passes_the_padding_mask(t5_encoder, tiny_t5_dir):
    states, mask = t5_encoder(CAPTIONS)
    assert states.shape == (3, 120, 32) and states.dtype == torch.float32
    assert mask.sum(dim=1).tolist() == [7, 7, 1]  # words + </s>
    model = T5EncoderModel.from_pretrained(tiny_t5_dir.path).eval()
    tokens = t5_encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        masked = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        unmasked = model(input_ids=tokens.input_ids).last_hidden_state
    torch.testing.assert_close(states, masked)
    assert not torch.allclose(states, unmasked)


def test_t5_truncates_long_captions(t5_encoder):
    tokens = t5_encoder.tokenize(["the dog " * 100])
    assert tokens.input_ids.shape == (1, 120) and tokens.attention_mask.sum().item() == 120
    assert tokens.input_ids[0, -1].item() == 1  # </s> kept


def test_minilm_from_the_installed_package():
    encoder = load_text_encoder("minilm", dtype=torch.bfloat16)
    states, mask = encoder(["a cat", "a kitten", "a red car on a busy road"])
    assert states.shape == (3, 32, 384) and states.dtype == torch.bfloat16
    pooled = (states.float() * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    similarity = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # cat is near kitten, far from car


def test_minilm_16_is_minilm_cut_to_16_tokens():
    """The short preset returns the first 16 states of the same encoder for a caption that fits in 16 tokens."""
    captions = ["two magenta triangles right of three yellow triangles", "a red circle"]
    long_states, long_mask = load_text_encoder("minilm")(captions)
    states, mask = load_text_encoder("minilm-16")(captions)
    assert states.shape == (2, 16, 384) and torch.equal(mask, long_mask[:, :16]) and long_mask[:, 16:].sum() == 0
    real = mask.bool()
    torch.testing.assert_close(states[real], long_states[:, :16][real], atol=1e-5, rtol=1e-4)


def test_encoders_are_frozen(hf_clip_encoder, t5_encoder):
    for encoder in (hf_clip_encoder, t5_encoder):
        assert not any(p.requires_grad for p in encoder.parameters())
        encoder.train()
        assert not any(module.training for module in encoder.modules())


@pytest.mark.parametrize(
    ("captions", "error", "message"),
    [
        ("a single caption", TypeError, r"wrap a single caption as \[caption\]"),
        (None, TypeError, "list of strings"),
        ([], ValueError, "at least one caption"),
        (["ok", 3], TypeError, r"\(1, 'int'\)"),
    ],
)
def test_bad_captions_give_clear_errors(hf_clip_encoder, captions, error, message):
    with pytest.raises(error, match=message):
        hf_clip_encoder(captions)


def test_encode_rejects_ids_of_the_wrong_length(hf_clip_encoder):
    with pytest.raises(ValueError, match=r"\(B, 77\)"):
        hf_clip_encoder.encode(torch.zeros(2, 10, dtype=torch.long), torch.ones(2, 10, dtype=torch.long))


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("bert-base", ValueError, "unknown text encoder"),
        ("openclip:ViT-B-32", ValueError, "gives no weights"),
        ("hf-clip:micro-diffusion-tests/no-such-clip", OSError, "huggingface-cli download"),
        ("openclip:ViT-B-32:/no/such/checkpoint.pt", OSError, "not a known tag or valid file path"),
    ],
)
def test_unloadable_names_give_clear_errors(name, error, message):
    with pytest.raises(error, match=message):
        load_text_encoder(name)
