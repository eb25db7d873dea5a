"""``slimtune encode``: a local diffusers pipeline's VAE and text encoder(s) turn a folder or JSONL of images and
captions into the latents file ``train --task diffusion --data`` reads — SD-1.5 style (trains tiny-unet on it), SDXL
style (two encoders, pooled embeddings, time ids) and Flux style (T5 features, CLIP pooled, packed latents: trains
tiny-dit); bad input is refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli import main
from slimtune.errors import ConfigError, DataError
from slimtune.train.encode import encode_dataset, load_image, read_samples

from .conftest import run_train

pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

WORDS = ["a", "red", "blue", "cat", "dog", "on", "the", "grass"]


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_length)


def make_pipeline(root, sdxl: bool = False, text_len: int = 8, hidden: int = 32, flux: bool = False):
    """A tiny SD-1.5 (SDXL, Flux) style pipeline directory with random weights: VAE factor 2, UNet sample size 16
    (so 32-pixel images), CLIP text encoder(s) of width ``hidden`` over ``text_len`` tokens; Flux: CLIP of width 16
    (tiny-dit's pooled width) and a T5 encoder of width 32 (its text width) over ``text_len`` tokens."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=32).save_pretrained(root / "vae")
    config = CLIPTextConfig(vocab_size=len(WORDS) + 2, hidden_size=16 if flux else hidden, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=text_len,
                            projection_dim=16)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    _tokenizer(text_len).save_pretrained(root / "tokenizer")
    if flux:
        T5EncoderModel(T5Config(vocab_size=len(WORDS) + 2, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
                       ).save_pretrained(root / "text_encoder_2")
        _tokenizer(text_len).save_pretrained(root / "tokenizer_2")
        (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
        return root
    if sdxl:
        CLIPTextModelWithProjection(config).save_pretrained(root / "text_encoder_2")
        _tokenizer(text_len).save_pretrained(root / "tokenizer_2")
    (root / "unet").mkdir(exist_ok=True)
    (root / "unet" / "config.json").write_text(json.dumps({"sample_size": 16}))
    name = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    (root / "model_index.json").write_text(json.dumps({"_class_name": name}))
    return root


def make_images(folder, sizes=((40, 32), (32, 48), (32, 32)), captions=("a red cat", "a blue dog", "grass")):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for i, ((w, h), caption) in enumerate(zip(sizes, captions)):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption + "\n")
    return folder


@pytest.mark.parametrize("base", ["preset", "pipeline-unet", "pipeline"])
def test_encode_then_train(base, tmp_path, capsys):
    """The README's two commands: encode a folder, then train on the file — tiny-unet's preset (8 text tokens), or
    the pipeline's own UNet (CLIP's 77 tokens, as SD-1.5 has), named by its folder or by the pipeline directory."""
    from diffusers import UNet2DConditionModel

    from slimtune.models.presets import get_preset

    text_len = 8 if base == "preset" else 77
    pipeline = make_pipeline(tmp_path / "pipe", text_len=text_len)
    UNet2DConditionModel(**dict(get_preset("tiny-unet").denoiser)).save_pretrained(pipeline / "unet")
    images = make_images(tmp_path / "images")
    out = tmp_path / "latents.safetensors"
    assert main(["encode", "--pipeline", str(pipeline), "--data", str(images), "--out", str(out), "--batch", "2",
                 "--device", "cpu", "--quiet"]) == 0
    assert "3 samples" in capsys.readouterr().out
    tensors = load_file(str(out))
    assert sorted(tensors) == ["encoder_hidden_states", "latents"]
    assert tensors["latents"].shape == (3, 4, 16, 16)
    assert tensors["encoder_hidden_states"].shape == (3, text_len, 32)
    model = {"preset": ["--preset", "tiny-unet"], "pipeline-unet": ["--model", str(pipeline / "unet")],
             "pipeline": ["--model", str(pipeline)]}[base]
    code, events, err = run_train(["--task", "diffusion", *model, "--data", str(out), "--out", str(tmp_path / "run"),
                                   "--batch", "2", "--max-steps", "2", "--rank", "4", "--device", "cpu", "--json"],
                                  capsys)
    assert code == 0, err
    assert len([e for e in events if e["event"] == "step"]) == 2


def test_rows_are_the_encoders_outputs(tmp_path):
    """Each row is the VAE posterior's mean times the scaling factor and the text encoder's last hidden state, for
    that sample alone: the batch size does not change it, and a JSONL list gives the folder's file."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    pipeline = make_pipeline(tmp_path / "pipe")
    images = make_images(tmp_path / "images")
    by_one = load_file(str(encode_dataset(pipeline, images, tmp_path / "a.safetensors", batch_size=1,
                                          device="cpu").out))
    by_three = load_file(str(encode_dataset(pipeline, images, tmp_path / "b.safetensors", batch_size=3,
                                            device="cpu").out))
    for key in by_one:
        torch.testing.assert_close(by_one[key], by_three[key], rtol=1e-4, atol=1e-5)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae").double()
    pixels, _ = load_image(images / "img1.png", 32)
    want = vae.encode(pixels[None].double()).latent_dist.mean * vae.config.scaling_factor
    got = by_one["latents"][1:2].double()
    assert ((got - want).norm() / want.norm()) < 1e-4
    tok = AutoTokenizer.from_pretrained(pipeline / "tokenizer")
    ids = tok(["a blue dog"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    states = CLIPTextModel.from_pretrained(pipeline / "text_encoder").double()(ids).last_hidden_state
    assert ((by_one["encoder_hidden_states"][1:2].double() - states).norm() / states.norm()) < 1e-4
    # the same samples listed in a JSONL file (paths relative to it)
    listing = tmp_path / "images" / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"image": f"img{i}.png", "text": c})
                                 for i, c in enumerate(("a red cat", "a blue dog", "grass"))) + "\n")
    from_jsonl = load_file(str(encode_dataset(pipeline, listing, tmp_path / "c.safetensors", device="cpu").out))
    for key in by_one:
        torch.testing.assert_close(from_jsonl[key], by_three[key])


def test_centre_crop_keeps_the_middle(tmp_path):
    """A 48x32 image (wide) resized to 32 high is cropped to its middle 32 columns: the left and right 8 go."""
    pixels = torch.zeros(32, 48, 3, dtype=torch.uint8)
    pixels[:, 8:40] = 255
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    image, (height, width, top, left) = load_image(tmp_path / "wide.png", 32)
    assert image.shape == (3, 32, 32) and (height, width, top, left) == (32, 48, 0, 8)
    assert torch.all(image == 1.0)


def test_sdxl_style_pipeline(tmp_path):
    pipeline = make_pipeline(tmp_path / "pipe", sdxl=True)
    images = make_images(tmp_path / "images")
    tensors = load_file(str(encode_dataset(pipeline, images, tmp_path / "x.safetensors", device="cpu").out))
    assert sorted(tensors) == ["encoder_hidden_states", "latents", "text_embeds", "time_ids"]
    assert tensors["encoder_hidden_states"].shape == (3, 8, 64)  # both encoders' penultimate states side by side
    assert tensors["text_embeds"].shape == (3, 16)  # the second encoder's projection
    # original (height, width), crop (top, left) in resized pixels, target size
    assert tensors["time_ids"].tolist() == [[32, 40, 0, 4, 32, 32], [48, 32, 8, 0, 32, 32], [32, 32, 0, 0, 32, 32]]


def test_flux_style_pipeline_trains_tiny_dit(tmp_path, capsys):
    """Flux: latents packed in 2x2 patches as FluxPipeline packs them, T5's last hidden state, CLIP's pooled output;
    the file trains tiny-dit (16 packed channels, 8 text tokens of width 32, pooled width 16)."""
    from diffusers import AutoencoderKL

    pipeline = make_pipeline(tmp_path / "pipe", flux=True)
    images = make_images(tmp_path / "images")
    with pytest.raises(ConfigError, match="--resolution 18: must be a positive multiple of 4 .*2x2"):
        encode_dataset(pipeline, images, tmp_path / "f.safetensors", resolution=18, device="cpu")
    out = encode_dataset(pipeline, images, tmp_path / "f.safetensors", resolution=16, device="cpu").out
    tensors = load_file(str(out))
    assert sorted(tensors) == ["encoder_hidden_states", "latents", "pooled_projections"]
    assert tensors["latents"].shape == (3, 16, 16)  # (16 px / 2 / 2)² tokens of 4 channels x 2x2
    assert tensors["encoder_hidden_states"].shape == (3, 8, 32) and tensors["pooled_projections"].shape == (3, 16)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae")
    pixels, _ = load_image(images / "img0.png", 16)
    latent = (vae.encode(pixels[None]).latent_dist.mean * vae.config.scaling_factor)[0]  # [4, 8, 8]
    # token (i, j) holds channels c of the 2x2 patch at rows 2i..2i+1, columns 2j..2j+1, channel-major
    i, j = 1, 2
    want = latent[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1)
    torch.testing.assert_close(tensors["latents"][0, 4 * i + j], want, rtol=1e-4, atol=1e-5)
    code, events, err = run_train(["--task", "diffusion", "--preset", "tiny-dit", "--data", str(out), "--out",
                                   str(tmp_path / "run"), "--batch", "2", "--max-steps", "2", "--rank", "4",
                                   "--device", "cpu", "--json"], capsys)
    assert code == 0, err


def test_bad_input_is_named(tmp_path):
    pipeline = make_pipeline(tmp_path / "pipe")
    images = make_images(tmp_path / "images")
    out = tmp_path / "o.safetensors"
    (images / "img1.txt").unlink()
    with pytest.raises(DataError, match=r"without a caption file .*img1\.png"):
        read_samples(images)
    with pytest.raises(DataError, match="no image files"):
        read_samples(tmp_path / "pipe" / "unet")
    with pytest.raises(DataError, match="no such folder or file"):
        read_samples(tmp_path / "nowhere")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"image": "images/img0.png", "text": "a cat"}\n{"img": "x.png"}\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object with \"image\" and \"text\""):
        read_samples(bad_line)
    bad_line.write_text('{"image": "images/missing.png", "text": "a cat"}\n')
    with pytest.raises(DataError, match=r"line 1: no image file .*missing\.png"):
        read_samples(bad_line)
    (images / "img1.txt").write_text("a blue dog")
    (images / "img2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"img2\.png: not a readable image"):
        encode_dataset(pipeline, images, out, device="cpu")
    make_images(images)
    with pytest.raises(ConfigError, match=r"--resolution 33: must be a positive multiple of 2 \(the VAE.s factor\)"):
        encode_dataset(pipeline, images, out, resolution=33, device="cpu")
    with pytest.raises(ConfigError, match="not a floating-point torch dtype"):
        encode_dataset(pipeline, images, out, dtype="int8")
    with pytest.raises(ConfigError, match="--batch must be at least 1"):
        encode_dataset(pipeline, images, out, batch_size=0)
    with pytest.raises(ConfigError, match="no model_index.json"):
        encode_dataset(tmp_path / "images", images, out, device="cpu")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
    with pytest.raises(ConfigError, match=r"no text_encoder_2/ folder \(FluxPipeline style\)"):
        encode_dataset(pipeline, images, out, device="cpu")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline", "transformer": []}))
    with pytest.raises(ConfigError, match="SanaPipeline has a transformer denoiser that slimtune encode does not know"):
        encode_dataset(pipeline, images, out, device="cpu")
    assert not out.exists()


def test_a_pipeline_directory_names_its_denoiser(tmp_path):
    """``train --task diffusion --model`` takes a pipeline directory for its unet/ (or transformer/) folder; one
    without either is refused by name; any other directory is taken as it is."""
    from slimtune.models.diffusion import denoiser_directory

    pipeline = make_pipeline(tmp_path / "pipe")
    assert denoiser_directory(str(pipeline)) == str(pipeline / "unet")
    assert denoiser_directory(str(pipeline / "unet")) == str(pipeline / "unet")
    assert denoiser_directory(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    (pipeline / "unet" / "config.json").unlink()
    with pytest.raises(ConfigError, match="a diffusers pipeline directory without a unet or transformer/config.json"):
        denoiser_directory(str(pipeline))


def test_shards_hold_the_same_rows_and_train(tmp_path, capsys):
    """``--shard-rows``: the folder's files, in order, hold the single file's rows; ``train --data`` takes the folder;
    a folder that already holds latents, a bad count, an empty folder and a shard of other shapes are refused."""
    from slimtune.models.presets import get_preset
    from slimtune.train.latents import LatentData

    pipeline = make_pipeline(tmp_path / "pipe")
    images = make_images(tmp_path / "images")
    whole = load_file(str(encode_dataset(pipeline, images, tmp_path / "one.safetensors", device="cpu").out))
    shards = tmp_path / "shards"
    assert main(["encode", "--pipeline", str(pipeline), "--data", str(images), "--out", str(shards), "--batch", "3",
                 "--shard-rows", "2", "--device", "cpu", "--quiet"]) == 0
    files = sorted(shards.iterdir())
    assert [f.name for f in files] == ["part-00000.safetensors", "part-00001.safetensors"]
    parts = [load_file(str(f)) for f in files]
    for key in whole:
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key])
    data = LatentData(shards, get_preset("tiny-unet"), torch.float32, seed=0)
    assert len(data) == 3 and torch.equal(data.row("latents", 2), parts[1]["latents"][0:1])
    code, events, err = run_train(["--task", "diffusion", "--preset", "tiny-unet", "--data", str(shards), "--out",
                                   str(tmp_path / "run"), "--batch", "2", "--max-steps", "2", "--rank", "4",
                                   "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    with pytest.raises(ConfigError, match="give a new or empty folder"):
        encode_dataset(pipeline, images, shards, shard_rows=2, device="cpu")
    with pytest.raises(ConfigError, match="--shard-rows must be at least 1"):
        encode_dataset(pipeline, images, tmp_path / "other", shard_rows=0, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .safetensors files"):
        LatentData(tmp_path / "empty", get_preset("tiny-unet"), torch.float32, seed=0)
    from safetensors.torch import save_file

    save_file({**parts[1], "latents": torch.zeros(1, 4, 8, 8)}, str(files[1]))
    with pytest.raises(DataError, match="part-00001.safetensors: 'latents' rows are"):
        LatentData(shards, get_preset("tiny-unet"), torch.float32, seed=0)
