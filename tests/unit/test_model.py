"""StableDiffusionModel on the test kit: what trains, what stays frozen, the loss, save/load."""

import os

import numpy as np
import paddle
import pytest

from sd import diffusion
from sd.model import StableDiffusionModel
from sd.sd_args import ModelArguments


def make(tiny_kit, **kw):
    args = ModelArguments(pretrained_model_name_or_path=tiny_kit,
                          unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json"),
                          model_max_length=16, **kw)
    paddle.seed(0)
    return StableDiffusionModel(args)


def batch(model, n=2):
    ids = model.tokenizer(["a red circle on a white background"] * n, padding="max_length", max_length=16,
                          return_attention_mask=False)["input_ids"]
    pixels = np.random.default_rng(0).uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32)
    return paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(pixels)


def perturb_zero_initialised(unet, seed=0):
    """Seeded small weights in the layers init zeroes (conv_out, resnets' conv2, transformers' proj_out):
    with them at zero every prediction is 0 and a comparison of predictions could not fail."""
    from ppdiffusers.models.resnet import ResnetBlock2D
    from ppdiffusers.models.transformer_2d import Transformer2DModel

    rng = np.random.default_rng(seed)
    layers = [unet.conv_out] + [layer.conv2 if isinstance(layer, ResnetBlock2D) else layer.proj_out
                                for layer in unet.sublayers() if isinstance(layer, (ResnetBlock2D, Transformer2DModel))]
    for layer in layers:
        for p in layer.parameters():
            p.set_value(paddle.to_tensor(0.05 * rng.standard_normal(p.shape, dtype=np.float32)))


def snapshot(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


def test_zero_initialised_output_layers(tiny_kit):
    m = make(tiny_kit)
    assert np.all(m.unet.conv_out.weight.numpy() == 0)
    ids, px = batch(m)
    latents = paddle.zeros([2, 4, 16, 16])
    out = m.unet(latents, paddle.to_tensor([10, 10]), encoder_hidden_states=m.encode_text(ids)).sample
    assert float(out.abs().max()) == 0.0  # the first prediction is zero


def test_one_step_changes_only_trainable_parameters(tiny_kit):
    m = make(tiny_kit)
    m.train()
    frozen = {"vae": snapshot(m.vae), "text_encoder": snapshot(m.text_encoder)}
    unet_before = snapshot(m.unet)
    opt = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=[p for _, ps in m.trainable_groups() for p in ps])
    ids, px = batch(m)
    loss = m(ids, px, seeds=[1, 11])
    loss.backward()
    opt.step()
    assert not m.vae.training and not m.text_encoder.training  # frozen parts stay in eval mode
    for name, before in frozen.items():
        after = snapshot(getattr(m, name))
        assert all(np.array_equal(before[k], after[k]) for k in before), name
    after = snapshot(m.unet)
    assert any(not np.array_equal(unet_before[k], after[k]) for k in after)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_equals_hand_computation(tiny_kit, prediction_type):
    m = make(tiny_kit, prediction_type=prediction_type, snr_gamma=5.0)
    perturb_zero_initialised(m.unet)
    ids, px = batch(m)
    loss = float(m(ids, px, seeds=[7, 8]))
    # Replay the documented draw order by hand: each sample's own generator gives its ε, noise, timestep.
    rngs = [np.random.default_rng(7), np.random.default_rng(8)]
    dist = m.vae.encode(px).latent_dist
    eps = np.stack([r.standard_normal(dist.mean.shape[1:], dtype=np.float32) for r in rngs])
    x0 = ((dist.mean + dist.std * paddle.to_tensor(eps)) * m.scaling_factor).numpy()
    noise = np.stack([r.standard_normal(x0.shape[1:], dtype=np.float32) for r in rngs])
    t = np.array([r.integers(0, 1000) for r in rngs])
    a = np.asarray(m.noise_scheduler.alphas_cumprod, np.float64)[t][:, None, None, None]
    noisy = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    pred = m.unet(paddle.to_tensor(noisy.astype(np.float32)), paddle.to_tensor(t),
                  encoder_hidden_states=m.encode_text(ids)).sample.numpy()
    assert np.abs(pred).mean() > 1e-2  # a real prediction, not the zero of a fresh UNet
    target = noise if prediction_type == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * x0
    snr = (a / (1 - a)).reshape(-1)
    w = np.minimum(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = float(np.mean(((pred - target) ** 2).mean(axis=(1, 2, 3)) * w))
    assert loss == pytest.approx(expected, rel=1e-4)


def test_a_samples_draws_do_not_depend_on_its_batch(tiny_kit):
    """Each sample draws from its own seed: a batch's loss is the mean of its samples' losses taken one
    by one (what makes 2 ranks × 4 train as 1 × 8), and the seeds must be one per sample."""
    m = make(tiny_kit, noise_offset=0.1, input_perturbation=0.1)
    perturb_zero_initialised(m.unet)
    ids, px = batch(m, 3)
    with paddle.no_grad():
        together = float(m(ids, px, seeds=[4, 5, 6]))
        alone = [float(m(ids[i:i + 1], px[i:i + 1], seeds=[s])) for i, s in enumerate([4, 5, 6])]
        swapped = float(m(ids, px, seeds=[5, 4, 6]))
    assert together == pytest.approx(np.mean(alone), rel=1e-5)
    assert abs(swapped - together) > 1e-4  # the seed belongs to the sample
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        m(ids, px, seeds=[4, 5])


def capture_unet_inputs(m, monkeypatch):
    seen = {}
    real_unet_forward = m.unet.forward

    def spy(sample, t, **kw):
        seen["noisy"], seen["t"] = sample.numpy().copy(), t.numpy().copy()
        return real_unet_forward(sample, t, **kw)

    monkeypatch.setattr(m.unet, "forward", spy)
    real_loss = diffusion.diffusion_loss
    monkeypatch.setattr(diffusion, "diffusion_loss", lambda p, tgt,
                        w=None: seen.update(target=tgt.numpy().copy()) or real_loss(p, tgt, w))
    return seen


def unet_inputs_per_setting(tiny_kit, monkeypatch, option: str, values) -> list:
    """What the UNet and the loss saw for one batch (same seeds) with ``option`` set to each of ``values``."""
    runs = []
    for value in values:
        m = make(tiny_kit, **{option: value})
        seen = capture_unet_inputs(m, monkeypatch)
        ids, px = batch(m)
        m(ids, px, seeds=[3, 13])
        runs.append(seen)
    return runs


def test_noise_offset_adds_a_per_channel_constant(tiny_kit, monkeypatch):
    runs = unet_inputs_per_setting(tiny_kit, monkeypatch, "noise_offset", (0.0, 0.5))
    assert np.array_equal(runs[0]["t"], runs[1]["t"])
    diff = runs[1]["noisy"] - runs[0]["noisy"]
    assert np.abs(diff).max() > 1e-3
    assert np.allclose(diff, diff[:, :, :1, :1], atol=1e-5)  # constant over each (sample, channel)


def test_input_perturbation_changes_input_not_target(tiny_kit, monkeypatch):
    runs = unet_inputs_per_setting(tiny_kit, monkeypatch, "input_perturbation", (0.0, 0.3))
    assert not np.allclose(runs[0]["noisy"], runs[1]["noisy"])
    assert np.array_equal(runs[0]["target"], runs[1]["target"])


def test_save_load_round_trip(tiny_kit, tmp_path):
    m = make(tiny_kit, use_ema=True)
    for p in m.unet.parameters():  # move away from the zero init so the check means something
        p.set_value(p + 0.01 * paddle.randn(p.shape))
    m.ema.update(m.unet)
    m.save_trained(str(tmp_path))
    assert os.path.isfile(tmp_path / "unet" / "diffusion_paddle_model.ema.safetensors")
    fresh = make(tiny_kit, use_ema=True)
    fresh.load_trained(str(tmp_path))
    x, t = paddle.randn([1, 4, 16, 16]), paddle.to_tensor([5])
    ids, _ = batch(m, 1)
    h = m.encode_text(ids)
    np.testing.assert_array_equal(m.unet(x, t, encoder_hidden_states=h).sample.numpy(),
                                  fresh.unet(x, t, encoder_hidden_states=h).sample.numpy())
    assert all(np.array_equal(m.ema.shadow[k].numpy(), fresh.ema.shadow[k].numpy()) for k in m.ema.shadow)


def test_mismatched_cross_attention_is_a_clear_error(tiny_kit, tmp_path):
    import json

    cfg = json.load(open(os.path.join(tiny_kit, "unet", "config.json")))
    cfg["cross_attention_dim"] = 48
    (tmp_path / "unet.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cross_attention_dim 48"):
        StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=tiny_kit,
                                            unet_name_or_path=str(tmp_path / "unet.json")))


def test_recompute_gives_the_same_loss_and_gradients(tiny_kit):
    grads = []
    for recompute in (False, True):
        args = ModelArguments(pretrained_model_name_or_path=tiny_kit, model_max_length=16,
                              unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json"))
        paddle.seed(0)
        m = StableDiffusionModel(args, recompute=recompute)
        perturb_zero_initialised(m.unet)  # else the UNet predicts 0 and most gradients vanish
        m.train()
        ids, px = batch(m)
        loss = m(ids, px, seeds=[2, 12])
        loss.backward()
        grads.append((float(loss),
                      {n: p.grad.numpy().copy() for n, p in m.unet.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    inner = [n for n in grads[0][1] if "down_blocks" in n and "conv1" in n]  # behind a zero-initialised layer at init
    assert inner and all(np.abs(grads[0][1][n]).max() > 0 for n in inner)
    for n in grads[0][1]:
        np.testing.assert_allclose(grads[0][1][n], grads[1][1][n], rtol=1e-4, atol=1e-6, err_msg=n)


def test_unet_from_a_weights_folder_is_loaded_not_reinitialised(tiny_kit):
    from safetensors.numpy import load_file

    m = StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=tiny_kit, model_max_length=16))
    saved = load_file(os.path.join(tiny_kit, "unet", "diffusion_paddle_model.safetensors"))
    state = m.unet.state_dict()
    assert saved and all(np.array_equal(saved[k], state[k].numpy()) for k in saved)


def test_save_pipeline_is_loadable_on_its_own(tiny_kit, tmp_path):
    from ppdiffusers import StableDiffusionPipeline

    m = make(tiny_kit, use_ema=True)
    for p in m.unet.parameters():
        p.set_value(p + 0.01 * paddle.randn(p.shape))
    m.save_pipeline(str(tmp_path))
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert os.path.isfile(tmp_path / "unet" / "diffusion_paddle_model.ema.safetensors")
    x, t = paddle.randn([1, 4, 16, 16]), paddle.to_tensor([5])
    h = m.encode_text(batch(m, 1)[0])
    np.testing.assert_array_equal(m.unet(x, t, encoder_hidden_states=h).sample.numpy(),
                                  pipe.unet(x, t, encoder_hidden_states=h).sample.numpy())
    assert pipe.scheduler.config.num_train_timesteps == 1000
