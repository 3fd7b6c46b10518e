"""Precomputed latents: the tool's output, the dataset's stream (same as the images'), resume, and the loss path."""

import itertools
import os

import numpy as np
import paddle
import pytest

from sd.data.formats import BadRecord, encode_latent_line, parse_latent_line
from sd.latent_dataset import LatentDataset, decode_array, read_info
from sd.runtime.run_state import RunState
from sd.text_image_pair_dataset import TextImagePairDataset


@pytest.fixture(scope="module")
def latents(tiny_kit, demo_file_list, tmp_path_factory):
    """The 72-image demo data at 32 px, precomputed in float32 (exact comparisons) with the test kit."""
    from sd.tools.precompute_latents import precompute

    out = tmp_path_factory.mktemp("latents")
    return precompute(demo_file_list, str(out), tiny_kit, resolution=32, batch_size=16, dtype="float32",
                      model_max_length=16, log=lambda *a: None)


def take(ds, n):
    """The first n samples of a one-slot dataset."""
    return list(itertools.islice(itertools.chain.from_iterable(ds), n))


def test_line_format_round_trip_and_errors():
    m = np.arange(8, dtype=np.float16).reshape(2, 2, 2)
    h = np.ones((3, 4), np.float16)
    caption, mean, std, hidden = parse_latent_line(encode_latent_line("a\tcat", m, m + 1, h).encode())
    assert caption == "a cat" and np.array_equal(mean, m) and np.array_equal(std, m + 1) and np.array_equal(hidden, h)
    line = encode_latent_line("x", m, m, h)
    for bad, reason in ((b"cap\tNONE\tabc", "too_few_fields"), (line.replace("float16", "int8").encode(), "bad_latent"),
                        (line.replace(":2,2,2:", ":2,2,3:").encode(), "bad_latent")):
        with pytest.raises(BadRecord) as e:
            parse_latent_line(bad)
        assert e.value.reason == reason


def test_tool_output_matches_the_vae_and_text_encoder(latents, tiny_kit, demo_file_list, tokenizer):
    from ppdiffusers import AutoencoderKL
    from ppdiffusers.transformers import CLIPTextModel

    entries = open(latents).read().split()
    assert len(entries) == 1 and entries[0].endswith("custom_dataset.filelist")
    filelist = entries[0]
    info = read_info(filelist)
    assert info["latent_shape"] == [4, 16, 16] and info["hidden_shape"] == [16, 32] and info["records_written"] == 72
    assert info["crop"] == "center"
    parts = open(filelist).read().split()
    assert len(parts) == 3
    # The first record against the models, on the image as training centre-crops it.
    images = TextImagePairDataset(demo_file_list, tokenizer, resolution=32, center_crop=True, drop_caption_prob=0.0,
                                  model_max_length=16)
    from sd.data.formats import decode_part_record, iter_part_file, read_filelist, read_filelist_list

    src_part = read_filelist(read_filelist_list(demo_file_list)[0].path)[0].path
    caption, data = decode_part_record(next(iter_part_file(src_part)))
    pixels = images.load_image(data, None)  # the centre crop draws nothing
    from sd.data.formats import resolve_path

    got_caption, mean, std, hidden = parse_latent_line(next(iter_part_file(resolve_path(parts[0], filelist))))
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_kit, "vae"))
    vae.eval()
    text = CLIPTextModel.from_pretrained(os.path.join(tiny_kit, "text_encoder"))
    text.eval()
    with paddle.no_grad():
        dist = vae.encode(paddle.to_tensor(pixels[None].astype(np.float32) * (2 / 255) - 1)).latent_dist
        ids = paddle.to_tensor([images.tokenize(caption), images.tokenize("")])
        states = text(ids)[0].numpy()
    assert got_caption == caption
    np.testing.assert_allclose(mean, dist.mean.numpy()[0], atol=1e-5)
    np.testing.assert_allclose(std, dist.std.numpy()[0], atol=1e-6)
    np.testing.assert_allclose(hidden, states[0], atol=1e-5)
    np.testing.assert_allclose(decode_array(info["empty_caption_hidden_states"]), states[1], atol=1e-5)


@pytest.mark.parametrize("slot,num_slots", [(0, 1), (1, 2), (4, 6)])
def test_streams_and_shards_like_the_images(latents, demo_file_list, tokenizer, slot, num_slots):
    """Same seed and slot of the same global batch → the same records in the same order, the same caption drops."""
    images = TextImagePairDataset(demo_file_list, tokenizer, resolution=32, center_crop=True, drop_caption_prob=0.3,
                                  model_max_length=16, seed=3, slots=[slot], num_slots=num_slots, shuffle_buffer=8,
                                  return_meta=True)
    lat = LatentDataset(latents, tokenizer, drop_caption_prob=0.3, seed=3, slots=[slot], num_slots=num_slots,
                        shuffle_buffer=8, return_meta=True)
    a, b = take(images, 40), take(lat, 40)
    assert [s["caption"] for s in a] == [s["caption"] for s in b]
    assert [s["epoch"] for s in a] == [s["epoch"] for s in b]
    assert [list(s["stream_state"]) for s in a] == [list(s["stream_state"]) for s in b]
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert "" in [s["caption"] for s in b]  # some dropped
    dropped = [s for s in b if s["caption"] == ""]
    assert all(np.array_equal(s["encoder_hidden_states"], lat.empty_hidden) for s in dropped)


def test_fast_forward_continues_the_stream(latents, tokenizer):
    full = take(LatentDataset(latents, tokenizer, seed=1, shuffle_buffer=8, return_meta=True), 12)
    by_count = LatentDataset(latents, tokenizer, seed=1, shuffle_buffer=8, return_meta=True)
    by_count.fast_forward(8)
    exact = LatentDataset(latents, tokenizer, seed=1, shuffle_buffer=8, return_meta=True)
    exact.fast_forward(8, positions={0: int(full[7]["stream_state"][1])})
    for ds in (by_count, exact):
        rest = take(ds, 4)
        assert [s["caption"] for s in rest] == [s["caption"] for s in full[8:]]
        assert all(np.array_equal(x["latent_mean"], y["latent_mean"]) for x, y in zip(rest, full[8:]))


def test_collate_and_settings_check(latents, tokenizer):
    ds = LatentDataset(latents, tokenizer, seed=0)
    batch = LatentDataset.collate_fn(take(ds, 3))
    assert batch["latent_mean"].shape == [3, 4, 16, 16] and batch["encoder_hidden_states"].shape == [3, 16, 32]
    assert batch["stream_state"].shape == [3, 3]  # per sample: [slot, draws made, records skipped]
    with pytest.raises(ValueError, match="resolution=32"):
        LatentDataset(latents, tokenizer, expect={"resolution": 64})


def test_tool_resumes_and_skips_finished_parts(latents, tiny_kit, demo_file_list):
    from sd.tools.precompute_latents import precompute

    out = os.path.dirname(os.path.dirname(latents))
    part = os.path.join(out, "latents_data", "part-000002.gz")
    before = open(part, "rb").read()
    os.remove(part)
    messages = []
    precompute(demo_file_list, out, tiny_kit, resolution=32, dtype="float32", model_max_length=16, log=messages.append)
    assert sum("already written" in m for m in messages) == 2  # parts 1 and 3 kept
    import gzip

    assert gzip.decompress(open(part, "rb").read()) == gzip.decompress(before)  # part 2 redone identically


def test_loss_samples_mean_plus_std_noise(latents, tiny_kit, demo_file_list, tokenizer):
    """Precomputed (float32) inputs give the faithful loss on the same centre crop and seed: the
    posterior is sampled with the step's ε in both; with σ = 0 the loss changes (ε is used)."""
    from sd.model import StableDiffusionModel
    from sd.sd_args import ModelArguments

    model = StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=tiny_kit, model_max_length=16,
                                                unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json")))
    paddle.seed(0)  # the zero-initialised output layer would predict 0 whatever the latents: randomise it
    w = model.unet.conv_out.weight
    w.set_value(paddle.randn(w.shape) * 0.1)
    images = TextImagePairDataset(demo_file_list, tokenizer, resolution=32, center_crop=True, drop_caption_prob=0.0,
                                  model_max_length=16, seed=2, shuffle_buffer=4)
    lat = LatentDataset(latents, tokenizer, drop_caption_prob=0.0, seed=2, shuffle_buffer=4)
    from sd.text_image_pair_dataset import collate_fn

    img_batch, lat_batch = collate_fn(take(images, 4)), LatentDataset.collate_fn(take(lat, 4))
    assert np.array_equal(img_batch["input_ids"].numpy(), lat_batch["input_ids"].numpy())
    with paddle.no_grad():
        seeds = [11, 12, 13, 14]
        faithful = float(model(img_batch["input_ids"], img_batch["pixel_values"], seeds=seeds))
        pre = float(model(seeds=seeds, **{k: v for k, v in lat_batch.items() if k != "stream_state"}))
        no_std = float(model(seeds=seeds, latent_mean=lat_batch["latent_mean"],
                             latent_std=paddle.zeros_like(lat_batch["latent_std"]),
                             encoder_hidden_states=lat_batch["encoder_hidden_states"]))
    assert abs(faithful - pre) < 1e-4 * abs(faithful)
    assert abs(no_std - pre) > 1e-6
    # sample_latents is (μ + σ·ε)·scale with each ε drawn first from its sample's generator
    mean, std = lat_batch["latent_mean"], lat_batch["latent_std"]
    z = model.sample_latents(mean, std, [np.random.default_rng(5 + i) for i in range(4)]).numpy()
    eps = np.stack([np.random.default_rng(5 + i).standard_normal(mean.shape[1:], dtype=np.float32) for i in range(4)])
    np.testing.assert_allclose(z, (mean.numpy() + std.numpy() * eps) * model.scaling_factor, rtol=1e-6, atol=1e-6)


def test_trains_through_the_trainer_without_running_the_encoders(latents, tiny_kit):
    from sd.tools.benchmark import run

    r = run(tiny_kit, latents, resolution=32, batch_size=2, num_workers=1, steps=2, warmup=1, latents=True,
            model_max_length=16, flops=False)
    assert r["steps"] == 2 and r["latent_sample_s"] > 0
    assert r["vae_encode_s"] == 0 and r["text_encode_s"] == 0  # never called


def test_precomputed_latents_refuse_a_trained_text_encoder():
    from sd.sd_args import DataArguments, ModelArguments, SDTrainingArguments, finalize

    with pytest.raises(ValueError, match="--train_text_encoder"):
        finalize(ModelArguments(train_text_encoder=True), DataArguments(precomputed_latents=True),
                 SDTrainingArguments(output_dir="/tmp/unused"), lambda msg, changed=True: None, argv=[])


@pytest.mark.long
def test_training_script_runs_on_precomputed_latents(latents, tiny_kit, tmp_path):
    """The user's command: train_txt2img_laion400m_trainer.py --precomputed_latents true, with a resume."""
    import subprocess

    from tests.helpers.common import ROOT, train_command

    cmd = train_command(tiny_kit, latents, tmp_path / "out", "--precomputed_latents", "true", "--save_steps", "2",
                        "--dataloader_num_workers", "1", "--report_to", "none", "--image_logging_steps", "1")
    runs = [subprocess.run(cmd + ["--max_steps", n], capture_output=True, text=True, cwd=ROOT, timeout=600)
            for n in ("2", "3")]
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "image logging needs image batches: off with --precomputed_latents" in runs[0].stdout + runs[0].stderr
    assert "the newest complete checkpoint" in runs[1].stdout + runs[1].stderr  # the second run resumed at step 2
    state = RunState.read(str(tmp_path / "out"))  # the final save, after step 3
    assert state.steps == 3 and state.global_batch == 4 and state.slots["3"]["position"] >= 3
