"""Optimiser parameter groups (weight decay, MoE learning rate) and learning-rate schedules."""

import math

import pytest
import torch
from composer.core import State, Timestamp
from composer.devices import DeviceCPU
from composer.optim import compile_composer_scheduler
from torch import nn

from micro_diffusion.models.dit import create_dit
from micro_diffusion.models.layers import ExpertChoiceMoE
from micro_diffusion.models.model import create_latent_diffusion
from micro_diffusion.models.mp_layers import MPConv
from micro_diffusion.training.optim import SCHEDULERS, InverseSqrtScheduler, build_adamw, parameter_groups

LR, WEIGHT_DECAY, MOE_SCALE = 1e-3, 0.1, 0.5


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A class-conditional MicroDiT: norms, biases, an embedding table, MoE layers and fixed buffers."""
    torch.manual_seed(0)
    return create_latent_diffusion(
        vae_name="identity", text_encoder_name=None, num_classes=4, dit_arch="MicroDiT_XXS_2", in_channels=3,
        latent_res=8, dtype="float32",
    )


def group_of(groups: list[dict]) -> dict[int, dict]:
    membership: dict[int, dict] = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in membership, "a parameter is in two groups"
            membership[id(param)] = group
    return membership


def test_every_trainable_parameter_is_in_exactly_one_group(model):
    membership = group_of(parameter_groups(model, LR, WEIGHT_DECAY, MOE_SCALE))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(membership) == trainable
    assert trainable, "the model has trainable parameters"


def test_no_decay_on_norms_biases_and_embeddings(model):
    membership = group_of(parameter_groups(model, LR, WEIGHT_DECAY, MOE_SCALE))
    modules = dict(model.named_modules())
    checked = {"norm": 0, "bias": 0, "embedding": 0, "matrix": 0}
    for name, param in model.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        if isinstance(owner, nn.LayerNorm):
            kind = "norm"
        elif name.endswith(".bias"):
            kind = "bias"
        elif isinstance(owner, nn.Embedding):
            kind = "embedding"
        else:
            kind = "matrix"
        checked[kind] += 1
        expected = WEIGHT_DECAY if kind == "matrix" else 0.0
        assert membership[id(param)]["weight_decay"] == expected, name
    assert all(checked.values()), f"the model should have every kind of parameter: {checked}"
    assert membership[id(model.label_embedder.weight)]["weight_decay"] == 0.0


def test_no_decay_on_magnitude_preserving_weights():
    """MP linear layers and MP experts are renormalised at every training forward: decay would only fight that."""
    dit = create_dit("MicroDiT_XXS_2", input_size=8, in_channels=4, caption_channels=32, mp=True)
    membership = group_of(parameter_groups(dit, LR, WEIGHT_DECAY))
    mp_weights = [m.weight for m in dit.modules() if isinstance(m, MPConv)]
    experts = [p for m in dit.modules() if isinstance(m, ExpertChoiceMoE) for p in (m.w1, m.w2)]
    assert mp_weights and experts
    assert all(membership[id(p)]["weight_decay"] == 0.0 for p in [*mp_weights, *experts])
    assert membership[id(dit.x_embedder.proj.weight)]["weight_decay"] == WEIGHT_DECAY  # not MP: still decayed


def test_decay_all_reproduces_the_original(model):
    groups = parameter_groups(model, LR, WEIGHT_DECAY, MOE_SCALE, decay_all=True)
    assert {group["weight_decay"] for group in groups} == {WEIGHT_DECAY}


def test_moe_learning_rate_scale_applies_to_expert_weights_and_router(model):
    membership = group_of(parameter_groups(model, LR, WEIGHT_DECAY, MOE_SCALE))
    experts = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    assert experts, "MicroDiT_XXS_2 has MoE blocks"
    expert_ids = {id(p) for m in experts for p in (m.w1, m.w2, m.gate.weight)}
    for name, param in model.named_parameters():
        expected = LR * MOE_SCALE if id(param) in expert_ids else LR
        assert membership[id(param)]["lr"] == pytest.approx(expected), name
    assert {membership[i]["name"] for i in expert_ids} == {"moe_decay"}


def test_position_and_mask_buffers_are_not_optimised(model):
    optimised = {id(p) for group in parameter_groups(model, LR, WEIGHT_DECAY) for p in group["params"]}
    buffers = dict(model.dit.named_buffers())
    assert {"pos_embed", "mask_token"} <= set(buffers)
    assert not optimised & {id(buffers["pos_embed"]), id(buffers["mask_token"])}


def test_frozen_parameters_are_left_out():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].requires_grad_(False)
    groups = parameter_groups(net, LR, WEIGHT_DECAY)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in net[1].parameters()}
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(net, LR, WEIGHT_DECAY)


def test_an_moe_scale_without_moe_layers_is_an_error():
    with pytest.raises(ValueError, match="moe_lr_scale is 0.5 but the model has no expert-choice MoE layer"):
        parameter_groups(nn.Linear(2, 2), LR, WEIGHT_DECAY, moe_lr_scale=0.5)


def make_state(max_duration: str = "1000ba", model: nn.Module | None = None, optimizer=None) -> State:
    return State(
        model=model or nn.Linear(1, 1), rank_zero_seed=0, run_name="test", device=DeviceCPU(),
        max_duration=max_duration, optimizers=optimizer,
    )


def at(state: State, batch: int, batch_size: int = 32) -> State:
    state.timestamp = Timestamp(batch=batch, sample=batch * batch_size)
    return state


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_moe_scale_holds_under_a_schedule(model):
    optimizer = build_adamw(model, LR, WEIGHT_DECAY, (0.9, 0.999), 1e-8, moe_lr_scale=MOE_SCALE)
    state = make_state("100ba", model, optimizer)
    scheduler = compile_composer_scheduler(SCHEDULERS["cosine_with_warmup"](t_warmup="10ba", alpha_f=0.33), state)
    for batch in range(1, 60):
        at(state, batch)
        scheduler.step()
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["moe_decay"] == pytest.approx(MOE_SCALE * rates["decay"])
    assert rates["decay"] == pytest.approx(LR * (0.33 + 0.67 * 0.5 * (1 + math.cos(math.pi * 49 / 90))))


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        # The original stage 1: 2500 warm-up batches, cosine to 0.33 at 250K.
        ("cosine_with_warmup", dict(t_warmup="2500ba", alpha_f=0.33),
         {0: 0.0, 1250: 0.5, 2500: 1.0, 126250: 0.665, 250000: 0.33}),
        ("constant_with_warmup", dict(t_warmup="500ba"), {0: 0.0, 250: 0.5, 500: 1.0, 250000: 1.0}),
        ("constant", {}, {0: 1.0, 125000: 1.0, 250000: 1.0}),
        ("linear_with_warmup", dict(t_warmup="50000ba", alpha_f=0.0), {25000: 0.5, 50000: 1.0, 150000: 0.5}),
        # EDM2: flat until t_ref, then 1 / sqrt(t / t_ref); warm-up multiplies.
        ("inverse_sqrt", dict(t_ref="70000ba", t_warmup="1000ba"),
         {0: 0.0, 500: 0.5, 1000: 1.0, 70000: 1.0, 280000: 0.5, 250000: math.sqrt(70000 / 250000)}),
    ],
)
def test_schedule_values(name, arguments, expected):
    scheduler = SCHEDULERS[name](**arguments)
    state = make_state("250000ba")
    for batch, multiplier in expected.items():
        assert scheduler(at(state, batch)) == pytest.approx(multiplier), (name, batch)


def test_inverse_sqrt_counts_in_images():
    scheduler = InverseSqrtScheduler(t_ref="64000sp", t_warmup="6400sp")  # EDM2 states times in images
    state = make_state("10000ba")
    assert scheduler(at(state, 100, batch_size=32)) == pytest.approx(0.5)  # 3200 images into the warm-up
    assert scheduler(at(state, 8000, batch_size=32)) == pytest.approx(math.sqrt(64000 / 256000))


def test_inverse_sqrt_rejects_relative_times():
    with pytest.raises(ValueError, match="t_ref must be in ba"):
        InverseSqrtScheduler(t_ref="0.5dur")
    with pytest.raises(ValueError, match="positive"):
        InverseSqrtScheduler(t_ref="0ba")
