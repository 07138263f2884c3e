"""Rewards on tiny randomly initialised models of the real classes (open_clip CLIP, transformers BLIP)
and the real LAION aesthetic head; nothing is downloaded."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import network_rel_error

from loop_ray.prompts import load_prompts
from loop_ray.rewards import available_rewards, build_reward

torch.set_num_threads(1)

SHARED_HEAD = Path(__file__).resolve().parents[3] / "shared" / "data" / "ddpo" / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a green bench and a red car", "a cat", "a round clock and a square table",
           "A brown purse is sitting on a green bench.", "a dog", "fluffy clouds and a wooden floor",
           "a blue cup", "rubber gloves and a metallic spoon"]


def _images(n: int = 8, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[1] = 128  # a flat image
    images[2, :, : size // 2] = (255, 0, 0)
    return images


def _batch_equivalent(reward, images, prompts, model=None, gain=1.0):
    """Scores of a batch equal the scores of its images one at a time. A model reward's batch may take
    other CPU kernels, so they agree up to float32 rounding: the model's relative error sqrt(L n) u
    (tests/numerics.py) times `gain` (how many such errors the score adds up) at the scores' scale.
    Without a model (pure integer work such as JPEG encoding) they must be identical."""
    whole = reward(images, prompts)
    single = np.concatenate([reward(images[i:i + 1], prompts[i:i + 1]) for i in range(len(images))])
    assert whole.dtype == np.float32 and whole.shape == (len(images),)
    atol = 0.0 if model is None else gain * network_rel_error(model) * max(1.0, float(np.abs(whole).max()))
    np.testing.assert_allclose(whole, single, rtol=0, atol=atol)
    if model is not None:  # the tolerance is far below what another image or prompt changes
        assert atol < 0.01 * max(float(np.ptp(whole)), 1e-3)
    np.testing.assert_array_equal(whole, reward(images, prompts))  # deterministic
    return whole


def test_all_rewards_registered():
    names = available_rewards()
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clip_score", "blip_vqa", "http"):
        assert name in names


# ---------------------------------------------------------------------------------------------
# JPEG


def test_jpeg_rewards_follow_ddpo_definition(tmp_path):
    from PIL import Image

    images = _images()
    inc = build_reward("jpeg_incompressibility")
    comp = build_reward("jpeg_compressibility")
    sizes = _batch_equivalent(inc, images, PROMPTS)
    np.testing.assert_array_equal(comp(images, PROMPTS), -sizes)
    for i in (0, 1):  # size in kB (1000 bytes) of the quality-95 JPEG file, measured on disk
        Image.fromarray(images[i]).save(tmp_path / "x.jpg", quality=95)
        assert sizes[i] == pytest.approx((tmp_path / "x.jpg").stat().st_size / 1000, abs=1e-6)
    assert sizes[0] > 5 * sizes[1]  # noise is incompressible, a flat image is not
    low = build_reward("jpeg_incompressibility", quality=50)(images, PROMPTS)
    assert low[0] < 0.7 * sizes[0] and low[2] < sizes[2]
    with pytest.raises(ValueError, match="uint8"):
        inc(images.astype(np.float32), PROMPTS)
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_compressibility", quality=0)


# ---------------------------------------------------------------------------------------------
# open_clip: a tiny random model saved as an open_clip local-dir folder

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def _manual_clip_features(folder, images, prompts):
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]))
        txt = model.encode_text(tokenizer(prompts))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def test_clip_score_tiny_model(tiny_clip_dir):
    images = _images()
    reward = build_reward("clip_score", model_name=f"local-dir:{tiny_clip_dir}", device="cpu", batch_size=3)
    # 100 x a cosine of two embeddings: both embeddings' relative errors add
    scores = _batch_equivalent(reward, images, PROMPTS, reward.encoder.model, gain=2.0)
    assert np.all(np.abs(scores) <= 100.0)
    img, txt = _manual_clip_features(tiny_clip_dir, images, PROMPTS)
    np.testing.assert_allclose(scores, (100 * (img * txt).sum(-1)).numpy(), atol=1e-3)
    other = reward(images, PROMPTS[::-1])
    assert not np.allclose(other, scores)  # the score depends on the prompt


def test_clip_score_builtin_name_with_weights_file(tiny_clip_dir, tmp_path):
    import open_clip

    (tmp_path / "loopray-test-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "loopray-test-tiny.json")
    weights = str(tiny_clip_dir / "open_clip_pytorch_model.bin")
    by_file = build_reward("clip_score", model_name="loopray-test-tiny", pretrained=weights, device="cpu")
    by_dir = build_reward("clip_score", model_name=f"local-dir:{tiny_clip_dir}", device="cpu")
    images = _images(4)
    np.testing.assert_allclose(by_file(images, PROMPTS[:4]), by_dir(images, PROMPTS[:4]), atol=1e-5)


def test_open_clip_missing_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="put open_clip_config.json"):
        build_reward("clip_score", model_name=f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="weights file .*missing.bin not found"):
        build_reward("clip_score", model_name="ViT-L-14", pretrained=str(tmp_path / "missing.bin"))
    start = time.monotonic()  # a tag not in the cache fails at once (no download attempts)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        build_reward("aesthetic", model_name="ViT-L-14", pretrained="openai", cache_dir=str(tmp_path / "hf"))
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        build_reward("clip_score", model_name="no-such-model", pretrained="x")


def test_open_clip_tag_resolves_from_local_cache_only(tmp_path):
    from loop_ray.rewards.clip_score import _resolve_tag

    # the layout huggingface_hub gives a cached file: refs/main -> snapshots/<commit>/<file>
    repo = tmp_path / "models--timm--vit_large_patch14_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    path, cfg = _resolve_tag("ViT-L-14", "openai", str(tmp_path))
    assert Path(path).read_bytes() == b"weights"
    assert cfg["quick_gelu"] is True  # OpenAI's ViT-L/14 uses QuickGELU: the loader forces it


# ---------------------------------------------------------------------------------------------
# Aesthetic


def test_real_aesthetic_head_matches_hand_computation():
    from loop_ray.rewards.aesthetic import default_head_path, load_head

    head = load_head()  # the packaged copy
    assert head.in_dim == 768
    if SHARED_HEAD.is_file():  # the packaged copy is the upstream file, byte for byte
        assert default_head_path().read_bytes() == SHARED_HEAD.read_bytes()
    state = {k: v.double().numpy() for k, v in torch.load(default_head_path(), map_location="cpu").items()}
    rng = np.random.default_rng(0)
    e = rng.standard_normal((3, 768))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    h = e
    for i in (0, 2, 4, 6, 7):  # Linear layers, no activations (dropouts are identities at eval)
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    got = head(torch.from_numpy(e).float()).double().numpy()
    np.testing.assert_allclose(got, h[:, 0], rtol=1e-5, atol=1e-4)
    assert np.all(np.isfinite(got)) and got.std() > 0


def test_aesthetic_head_file_errors(tmp_path):
    from loop_ray.rewards.aesthetic import load_head

    with pytest.raises(FileNotFoundError, match="put sac\\+logos"):
        load_head(tmp_path / "missing.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="expected keys"):
        load_head(tmp_path / "bad.pth")


def test_aesthetic_pipeline_tiny_backbone(tiny_clip_dir, tmp_path):
    from loop_ray.rewards.aesthetic import AestheticHead

    torch.manual_seed(1)
    head = AestheticHead(16)
    torch.save(head.state_dict(), tmp_path / "head16.pth")
    reward = build_reward("aesthetic", model_name=f"local-dir:{tiny_clip_dir}", head_path=str(tmp_path / "head16.pth"),
                          device="cpu", batch_size=5)
    images = _images()
    # the head is linear: the embedding's relative error (and the head's own) carry to the score
    scores = _batch_equivalent(reward, images, PROMPTS, reward.encoder.model, gain=2.0)
    img, _ = _manual_clip_features(tiny_clip_dir, images, PROMPTS)
    h = img.double()
    for i in (0, 2, 4, 6, 7):
        h = h @ head.layers[i].weight.detach().double().T + head.layers[i].bias.detach().double()
    np.testing.assert_allclose(scores, h[:, 0].numpy(), atol=1e-4)
    assert scores.std() > 0
    with pytest.raises(ValueError, match="768"):  # the real head needs a 768-d backbone
        build_reward("aesthetic", model_name=f"local-dir:{tiny_clip_dir}", device="cpu")


# ---------------------------------------------------------------------------------------------
# BLIP-VQA


def test_noun_phrases_on_compbench_lines():
    from loop_ray.rewards.blip_vqa import noun_phrases, vqa_questions

    # the two-object template "a(n) ATTR NOUN and a(n) ATTR NOUN" (nouns of one to three words, article optional)
    half = r"((?:an? )?[a-z]+(?: [a-z'-]+){1,3})"
    template = re.compile(half + " and " + half)
    function_words = {"a", "an", "with", "in", "on", "of", "is", "are", "has", "the", "and", "to", "by", "next"}
    checked = 0
    for category in ("color", "shape", "texture"):
        for split in ("train", "val"):
            for prompt in load_prompts(f"compbench:{category}_{split}").prompts:
                m = template.fullmatch(prompt.lower().rstrip("."))
                inner = m and m.group(1).split()[1:] + m.group(2).split()[1:]
                if m and not function_words & set(inner):
                    assert noun_phrases(prompt) == [m.group(1), m.group(2)], prompt
                    checked += 1
    assert checked > 2000
    cases = {
        "a green bench and a red car": ["a green bench", "a red car"],
        "rubber sole shoes and fluffy clouds": ["rubber sole shoes", "fluffy clouds"],
        "a triangular slice of cake and a spherical cake topper": ["a triangular slice of cake",
                                                                   "a spherical cake topper"],
        "A black and white cat sits in a black sink.": ["a black and white cat", "a black sink"],
        "A man in a gray jacket standing in a kitchen next to a black dog.": [
            "a man", "a gray jacket", "a kitchen", "a black dog"],
        "two white sheep, a black goat and a white goat in a field": [
            "two white sheep", "a black goat", "a white goat", "a field"],
        "The fluffy snow falls on the metallic car and wooden fence.": [
            "the fluffy snow", "the metallic car", "wooden fence"],
        "The glass vase and metallic stand display the wooden flowers on the fabric dresser.": [
            "the glass vase", "metallic stand", "the wooden flowers", "the fabric dresser"],
        "A white dog standing in front of brown cabinets.": ["a white dog", "brown cabinets"],
        "a cat on top": ["a cat"],  # T2I-CompBench drops "top"
    }
    for prompt, expected in cases.items():
        assert noun_phrases(prompt) == expected, prompt
    assert vqa_questions("a green bench and a red car") == ["a green bench?", "a red car?"]
    assert vqa_questions("Sleeping.") == ["sleeping?"]


def _write_vocab(path: Path) -> list[str]:
    words = set()
    for split in ("color_val", "shape_val", "texture_val"):
        for prompt in load_prompts(f"compbench:{split}").prompts[:40]:
            words.update(re.findall(r"[a-z]+", prompt.lower()))
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", "?", ".", ",", "'", "-", "yes", "no"]
             + list(letters) + ["##" + c for c in letters] + sorted(words - {"yes", "no"} - set(letters)))
    path.write_text("\n".join(vocab) + "\n")
    return vocab


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab = _write_vocab(folder / "vocab.txt")
    assert 150 < len(vocab) < 1000
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "encoder_hidden_size": 32,
                     "pad_token_id": vocab.index("[PAD]"), "bos_token_id": vocab.index("[DEC]"),
                     "sep_token_id": vocab.index("[SEP]")},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    with torch.no_grad():  # make "yes"/"no" logits depend visibly on the inputs
        model.text_decoder.cls.predictions.decoder.weight.mul_(20.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_vqa_tiny_model(tiny_blip_dir):
    from loop_ray.rewards.blip_vqa import vqa_questions

    reward = build_reward("blip_vqa", path=str(tiny_blip_dir), device="cpu", batch_size=5)
    images = _images()
    # a product of P(yes) over up to two questions, each a softmax of the model's logits
    scores = _batch_equivalent(reward, images, PROMPTS, reward.model, gain=4.0)
    assert np.all((scores >= 0) & (scores <= 1)) and scores.std() > 0

    # each factor against transformers' own generate() logits for the question alone
    model, processor = reward.model, reward.processor
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    for i in (0, 3):
        expected = 1.0
        for q in vqa_questions(PROMPTS[i]):
            inputs = processor(images=images[i], text=q, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            logits = out.logits[0][0]
            expected *= torch.softmax(torch.stack([logits[yes], logits[no]]), 0)[0].item()
        assert scores[i] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert len(vqa_questions(PROMPTS[3])) == 2


def test_blip_vqa_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="put a folder with the model and its processor"):
        build_reward("blip_vqa", path=str(tmp_path / "blip-vqa-base"))
    with pytest.raises(FileNotFoundError, match="BLIP VQA weights not found"):
        build_reward("blip_vqa", path="Salesforce/no-such-model-in-cache")



# ---------------------------------------------------------------------------------------------
# What a reward returns is checked, never trusted; user rewards by import path


@pytest.mark.parametrize(
    "result, expected, problem",
    [
        ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], None),
        (np.array([1, 2, 3, 4], np.int64), [1.0, 2.0, 3.0, 4.0], None),
        (torch.tensor([0.5, 0.5, 0.5, 0.5]), [0.5] * 4, None),
        ([1.0, np.nan, 3.0, 4.0], [1.0, np.nan, 3.0, 4.0], r"returned non-finite values \(1 NaN\) for 4 images"),
        ([np.inf, 2.0, 3.0, 4.0], [np.nan, 2.0, 3.0, 4.0], r"\(1 \+inf\)"),
        ([1.0, 2.0, -np.inf, -np.inf], [1.0, 2.0, np.nan, np.nan], r"\(2 -inf\)"),
        ([1e300, 2.0, 3.0, 4.0], [np.nan, 2.0, 3.0, 4.0], r"\(1 \+inf\)"),  # beyond float32
        ([1.0, 2.0, 3.0], [np.nan] * 4, r"reward term 'x' returned shape \(3,\) for 4 images"),
        (np.ones((4, 1)), [np.nan] * 4, r"returned shape \(4, 1\) for 4 images"),
        (np.ones((2, 2)), [np.nan] * 4, r"returned shape \(2, 2\) for 4 images"),
        (1.0, [np.nan] * 4, r"returned shape \(\) for 4 images"),
        (["a", "b", "c", "d"], [np.nan] * 4, r"returned non-numeric values \(dtype <U1\)"),
        ([None, 1.0, 2.0, 3.0], [np.nan] * 4, r"returned non-numeric values \(dtype object\)"),
        ({"reward": 1.0}, [np.nan] * 4, r"returned non-numeric values \(dtype object\)"),
        (RuntimeError("server down"), [np.nan] * 4, r"reward term 'x' raised RuntimeError: server down"),
    ],
)
def test_check_rewards_marks_invalid_images(result, expected, problem):
    from loop_ray.rewards.checks import check_rewards

    values, found = check_rewards(result, 4, "x")
    assert values.dtype == np.float32 and values.shape == (4,)
    np.testing.assert_array_equal(values, np.asarray(expected, np.float32))
    if problem is None:
        assert found is None
    else:
        assert re.search(problem, found), found


def test_call_reward_catches_the_reward_raising(caplog):
    from loop_ray.rewards.checks import call_reward

    def broken(images, prompts):
        raise ValueError("bad model file")

    values, problem = call_reward(broken, _images(3), PROMPTS[:3], "broken")
    assert np.isnan(values).all() and values.shape == (3,)
    assert problem == "reward term 'broken' raised ValueError: bad model file"
    assert "reward term 'broken' raised" in caplog.text and "bad model file" in caplog.text  # with its traceback


def test_composite_reward_names_the_bad_term_and_keeps_the_good_ones():
    from loop_ray.rewards.composite import CompositeReward

    reward = CompositeReward([
        ("jpeg_incompressibility", 1.0, {}),
        ("faulty_rewards:PromptFaults", 0.0, {"nan_prompts": [PROMPTS[1]], "inf_prompts": [PROMPTS[2]]}),
    ])
    images = _images(4)
    scores = reward.score_checked(images, PROMPTS[:4])
    assert scores.valid.tolist() == [True, False, False, True]
    assert scores.problems == [
        "reward term 'faulty_rewards:PromptFaults' returned non-finite values (1 NaN, 1 +inf) for 4 images"
    ]
    good = build_reward("jpeg_incompressibility")(images, PROMPTS[:4])
    np.testing.assert_allclose(scores.total[[0, 3]], good[[0, 3]])
    np.testing.assert_array_equal(scores.parts["jpeg_incompressibility"], good)  # each term's own values
    total, parts = reward.score(images, PROMPTS[:4])  # the (total, parts) form local/eval use
    np.testing.assert_array_equal(total, scores.total)
    assert parts.keys() == scores.parts.keys()

    shape = CompositeReward([("jpeg_compressibility", 1.0, {}), ("faulty_rewards:wrong_shape", 1.0, {})])
    scores = shape.score_checked(images, PROMPTS[:4])
    assert not scores.valid.any()
    assert scores.problems == ["reward term 'faulty_rewards:wrong_shape' returned shape (5,) for 4 images"]
    raising = CompositeReward([("faulty_rewards:raises", 1.0, {})])
    assert raising.score_checked(images, PROMPTS[:4]).problems == [
        "reward term 'faulty_rewards:raises' raised RuntimeError: reward server unreachable"
    ]


def test_reward_by_import_path_builder_or_reward_itself():
    import faulty_rewards

    from loop_ray.rewards import load_import_path

    built = build_reward("faulty_rewards:PromptFaults", nan_prompts=["a cat"])  # a builder, given the kwargs
    assert isinstance(built, faulty_rewards.PromptFaults) and built.nan_prompts == {"a cat"}
    assert build_reward("faulty_rewards:wrong_shape") is faulty_rewards.wrong_shape  # the reward itself
    assert build_reward("loop_ray.rewards.jpeg:build_jpeg_compressibility", quality=50).quality == 50
    for path, error, message in [
        ("no_such_module_xyz:reward", ImportError, "cannot import 'no_such_module_xyz'"),
        ("faulty_rewards:nope", ImportError, "'faulty_rewards' has no attribute 'nope'"),
        ("faulty_rewards:NOT_CALLABLE", TypeError, "is a int, not a callable"),
        ("faulty_rewards:", ValueError, "package.module:callable"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            load_import_path(path)


# ---------------------------------------------------------------------------------------------
# Terms in their own Ray runtime environment: which actors score which terms, and the sum


def test_term_groups_split_terms_by_runtime_env():
    from loop_ray.config import config_from_dict
    from loop_ray.rewards.composite import term_groups

    env_a = {"py_modules": ["/x/a"], "env_vars": {"K": "1"}}
    reward = config_from_dict({"reward": {"terms": [
        {"name": "toy_binding"},
        {"name": "pkg_a:score", "runtime_env": env_a},
        {"name": "jpeg_compressibility"},
        {"name": "http", "runtime_env": {"env_vars": {"K": "2"}}},
        {"name": "pkg_b:score", "runtime_env": {"env_vars": {"K": "1"}, "py_modules": ["/x/a"]}},  # = env_a
    ], "runtime_env": {"env_vars": {"HF_HOME": "/m"}}}}).reward
    groups = term_groups(reward)
    assert [(g.terms, g.shared) for g in groups] == [((0, 2), True), ((1, 4), False), ((3,), False)]
    assert groups[0].runtime_env.to_ray() == {"env_vars": {"HF_HOME": "/m"}}  # reward.runtime_env
    assert groups[1].runtime_env.to_ray() == env_a
    assert groups[2].describe(reward) == "reward.terms.3 (http)"

    only_own = config_from_dict({"reward": {"terms": [{"name": "a:b", "runtime_env": env_a}]}}).reward
    assert [(g.terms, g.shared) for g in term_groups(only_own)] == [((0,), False)]  # no shared actors
    plain = config_from_dict({}).reward
    assert [(g.terms, g.shared, g.runtime_env) for g in term_groups(plain)] == [((0,), True, None)]


def test_combine_scores_adds_the_groups_up():
    from loop_ray.rewards.composite import combine_scores

    def result(rewards, parts, problems=(), seconds=1.0, rank=0):
        return {"rank": rank, "start": 8, "images": 3, "rewards": np.asarray(rewards, np.float32),
                "parts": parts, "problems": list(problems), "seconds": seconds}

    shared = result([1.0, 2.0, 3.0], {"a": np.ones(3, np.float32)}, seconds=2.0)
    own = result([0.5, np.nan, 0.25], {"b": np.zeros(3, np.float32)}, ["term 'b' returned NaN"], seconds=5.0, rank=1)
    out = combine_scores([shared, own])
    np.testing.assert_array_equal(out["rewards"], np.array([1.5, np.nan, 3.25], np.float32))
    assert out["parts"].keys() == {"a", "b"} and out["problems"] == ["term 'b' returned NaN"]
    assert (out["start"], out["images"], out["rank"], out["seconds"]) == (8, 3, 0, 5.0)
    with pytest.raises(ValueError, match="results of different chunks"):
        combine_scores([shared, {**own, "start": 0}])


def test_actor_options_merge_a_users_runtime_env():
    from loop_ray.system.launch.cluster import RoleResources, actor_options

    res = RoleResources(0.5, 0.0, {})
    plain = actor_options(res, 2)["runtime_env"]
    assert plain == {"env_vars": {**plain["env_vars"]}} and plain["env_vars"]["OMP_NUM_THREADS"] == "2"
    env = actor_options(res, 2, runtime_env={"pip": ["x==1"], "env_vars": {"OMP_NUM_THREADS": "4", "K": "v"}})
    assert env["runtime_env"]["pip"] == ["x==1"]
    assert env["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "4"  # the user's value wins
    assert env["runtime_env"]["env_vars"]["K"] == "v" and env["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"


def test_error_summary_takes_the_line_that_says_what_went_wrong():
    from loop_ray.system.launch.launch import error_summary

    err = RuntimeError("The actor died because of an error raised in its creation task\n  File x, line 3\n"
                       "ModuleNotFoundError: No module named 'a'\n\nDuring handling...\n"
                       "ImportError: reward 'a:b': cannot import 'a': No module named 'a'\n")
    assert error_summary(err) == "ImportError: reward 'a:b': cannot import 'a': No module named 'a'"
    assert error_summary(RuntimeError("Failed to set up runtime environment.\nmore")) == (
        "Failed to set up runtime environment.")
    assert len(error_summary(RuntimeError("ValueError: " + "x" * 1000))) == 300
