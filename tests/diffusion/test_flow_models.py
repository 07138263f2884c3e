"""SD3 / FLUX stacks: tiny random builds of the real classes, text conditioning and latent packing
against the diffusers pipelines, save -> check -> load round trips (LoRA merged), bad folders."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline
from numerics import network_rel_error

from loop_ray.diffusion.flow.loading import (
    FlowModelError,
    check_flow_folder,
    load_flow_components,
    save_flow_pipeline,
)
from loop_ray.diffusion.flow.models import (
    LORA_TARGETS,
    pipeline_class,
    tiny_flux_components,
    tiny_sd3_components,
)
from loop_ray.diffusion.flow.text import encode_prompts, flux_position_ids, pack_latents, unpack_latents
from loop_ray.diffusion.lora import add_lora, has_lora

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square on the left of a green triangle"]
BUILDERS = {"sd3": tiny_sd3_components, "flux": tiny_flux_components}


def _pipeline(components):
    pipe = pipeline_class(components.kind)(**components.pipeline_modules())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind, with_t5", [("sd3", True), ("sd3", False), ("flux", True)])
def test_text_conditioning_equals_the_pipelines(kind, with_t5):
    components = tiny_sd3_components(with_t5=with_t5) if kind == "sd3" else tiny_flux_components()
    embeds, pooled = encode_prompts(components, PROMPTS, max_sequence_length=8)
    pipe = _pipeline(components)
    if kind == "sd3":
        ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                   max_sequence_length=8, device="cpu")
        assert embeds.shape == (2, 16 + 8, 32) and pooled.shape == (2, 32)
    else:
        ref, ref_pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=8, device="cpu")
        assert embeds.shape == (2, 8, 32) and pooled.shape == (2, 16)
        assert torch.equal(flux_position_ids(8, 8, 8)[0], text_ids)
    # the pipeline encodes with autograd on, which may pick other kernels: equal up to float32 rounding
    for ours, theirs in ((embeds, ref.detach().float()), (pooled, ref_pooled.detach().float())):
        atol = max(network_rel_error(m) for m in components.text_encoders()) * float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    assert not torch.equal(embeds[0], embeds[1]) and not torch.equal(pooled[0], pooled[1])
    if kind == "sd3" and not with_t5:
        assert torch.equal(embeds[:, 16:], torch.zeros(2, 8, 32))  # SD3 without T5: zeros in its place


def test_flux_packing_and_image_ids_follow_the_pipeline():
    x = torch.randn(3, 4, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 4, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), x)
    _, image_ids = flux_position_ids(5, 8, 12)
    assert torch.equal(image_ids, FluxPipeline._prepare_latent_image_ids(3, 4, 6, "cpu", torch.float32))


def test_tiny_stacks_are_seeded_and_frozen_parts_are_in_eval_mode():
    for build in BUILDERS.values():
        a, b, c = build(seed=0), build(seed=0), build(seed=1)
        sa, sb, sc = (x.transformer.state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
        assert all(not m.training for m in a.text_encoders())


def _transformer_out(components, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = components.transformer
    with torch.no_grad():
        if components.kind == "sd3":
            x, e, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 24, 32, generator=g), torch.randn(2, 32, generator=g)
            return t(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=torch.tensor([900.0, 300.0])).sample
        txt, img = flux_position_ids(8, 8, 8)
        x, e, p = torch.randn(2, 16, 16, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 16, generator=g)
        return t(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=torch.tensor([0.9, 0.3]),
                 guidance=torch.tensor([3.5, 3.5]), txt_ids=txt, img_ids=img).sample


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_save_check_load_round_trip_with_lora_merged(kind, tmp_path):
    components = BUILDERS[kind](seed=2)
    add_lora(components.transformer, 4, 8, target_modules=LORA_TARGETS[kind])
    trainable = [n for n, p in components.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".attn.add_q_proj." in n for n in trainable)  # the context stream's projections too
    with torch.no_grad():
        for n, p in components.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    live = _transformer_out(components)

    folder = save_flow_pipeline(components, tmp_path / "pipe")
    assert has_lora(components.transformer)  # the live transformer keeps its adapters
    index = check_flow_folder(folder, kind)
    assert index["_class_name"] == ("StableDiffusion3Pipeline" if kind == "sd3" else "FluxPipeline")
    plain = pipeline_class(kind).from_pretrained(folder)  # plain diffusers, no loop-ray code
    assert not has_lora(plain.transformer)
    loaded = load_flow_components(str(folder), kind)
    assert not any(p.requires_grad for m in loaded.text_encoders() for p in m.parameters())
    assert all(p.requires_grad for p in loaded.transformer.parameters())
    for out in (_transformer_out(loaded), _transformer_out(type(loaded)(**{**vars(loaded), "transformer": plain.transformer}))):
        torch.testing.assert_close(out, live, rtol=1e-4, atol=1e-5)
    def public(config):
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    assert public(loaded.scheduler.config) == public(components.scheduler.config)
    assert dict(loaded.vae.config)["shift_factor"] == dict(components.vae.config)["shift_factor"]
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name)(PROMPTS).input_ids == getattr(components, name)(PROMPTS).input_ids


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_flow_pipeline(tiny_sd3_components(), tmp_path_factory.mktemp("sd3") / "pipe")


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_sd3_without_t5_loads(sd3_folder, tmp_path):
    folder = _copy(sd3_folder, tmp_path)
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_flow_components(str(folder), "sd3")
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_index", "no model_index.json"),
        ("sd_pipeline", ("names the pipeline 'StableDiffusionPipeline'; model.kind=sd3 drives StableDiffusion3Pipeline "
                        "(use model.kind=stable_diffusion)")),
        ("flux_pipeline", "(use model.kind=flux)"),
        ("no_transformer", "component folder transformer/ is missing"),
        ("unlisted_vae", "component 'vae' is not listed"),
        ("half_t5", "text_encoder_3/ without its pair"),
        ("ddim_scheduler", "component scheduler is 'DDIMScheduler', not a flow-matching FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_bad_folders_are_refused_naming_the_folder_and_component(sd3_folder, tmp_path, damage, message):
    folder = _copy(sd3_folder, tmp_path)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if damage == "no_index":
        index_path.unlink()
    elif damage in ("sd_pipeline", "flux_pipeline"):
        index["_class_name"] = "StableDiffusionPipeline" if damage == "sd_pipeline" else "FluxPipeline"
    elif damage == "no_transformer":
        shutil.rmtree(folder / "transformer")
    elif damage == "unlisted_vae":
        index["vae"] = [None, None]
    elif damage == "half_t5":
        shutil.rmtree(folder / "tokenizer_3")
        index["tokenizer_3"] = [None, None]
    elif damage == "ddim_scheduler":
        config_path = folder / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "DDIMScheduler"}))
    if index_path.exists():
        index_path.write_text(json.dumps(index))
    with pytest.raises(FlowModelError) as err:
        check_flow_folder(folder, "sd3")
    assert message in str(err.value) and str(folder) in str(err.value)
    with pytest.raises((FlowModelError, FileNotFoundError)):
        load_flow_components(str(folder), "sd3")


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere.*put a diffusers FluxPipeline folder"):
        load_flow_components(str(tmp_path / "nowhere"), "flux")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor in the local Hugging Face cache"):
        load_flow_components("black-forest-labs/FLUX.1-dev", "flux")
