"""Latent statistics on synthetic latents with known answers (encoder bypassed), each figure against
an independent numpy computation; streaming and two-process combination; reconstruction metrics;
the two evaluation commands end to end on tiny exports."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import scipy.fft
import torch
from conftest import cpu_env, launch_command
from PIL import Image

from first_stage.checkpoint import EXPORT_WEIGHTS, UnreadableWeightsError, load_vae
from first_stage.data import calibration_batches, describe
from first_stage.evaluation import (build_fid, evaluation_autoencoder, evaluation_data, latent_statistics, nonlocality,
                                    reconstruction_metrics, stream_images, summarize)
from first_stage.export import ExportOptions, ExportSource, export_autoencoder
from first_stage.latent_stats import GAUSSIAN_TAIL, LatentStatistics, dct_matrix, modal_share_by_chance
from first_stage.perceptual import load_lpips
from first_stage.reports import REPORT_SCHEMA, evaluation_summary, zhat_survival

REPO = Path(__file__).resolve().parents[1]


def run_stats(batches) -> dict:
    """One process over (z, logvar) batches: both passes, then the result."""
    stats = LatentStatistics(batches[0][0].shape[1], tuple(batches[0][0].shape[2:]))
    for z, logvar in batches:
        stats.first_pass(z, logvar)
    stats.finish_first_pass()
    for z, _ in batches:
        stats.second_pass(z)
    return stats.result()


def gaussian_latents(n=64, c=4, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return z, torch.full((n, c, h, w), -5.0, dtype=torch.float64)


def test_gaussian_latents_match_reference_and_numpy():
    z, logvar = gaussian_latents()
    r = run_stats([(z, logvar)])
    zn = z.numpy()
    mean, std = zn.mean((0, 2, 3)), zn.std((0, 2, 3))
    zhat = (zn - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(r["scale"]["channel_mean"], mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r["scale"]["channel_std"], std, rtol=1e-10)
    assert r["scale"]["std_of_means"] == pytest.approx(zn.std(), rel=1e-10)
    assert r["scale"]["std_of_samples"] == pytest.approx(math.sqrt(zn.var() + math.exp(-5.0)), rel=1e-10)
    for k in (3, 4, 6):
        exact = (np.abs(zhat) > k).mean((0, 2, 3))
        np.testing.assert_allclose(r["tails"][f"channel_p_abs_gt_{k}"], exact, rtol=1e-12)
    # Gaussian: the tails and the kurtosis agree with the reference within sampling error
    n = zn.size
    assert r["tails"]["p_abs_gt_3"] == pytest.approx(GAUSSIAN_TAIL[3], abs=4 * math.sqrt(GAUSSIAN_TAIL[3] / n))
    np.testing.assert_allclose(r["tails"]["channel_excess_kurtosis"], (zhat**4).mean((0, 2, 3)) - 3, rtol=1e-10)
    assert abs(r["tails"]["excess_kurtosis"]) < 0.1
    peaks = np.abs(zhat).reshape(len(zn), -1).max(1)
    assert r["peaks"]["median"] == pytest.approx(np.median(peaks), rel=1e-12)
    assert r["peaks"]["median"] == pytest.approx(r["peaks"]["gaussian"]["median"], rel=0.1)
    # white noise spreads its DCT energy evenly: 3/4 of the coefficients are in the upper half band
    coef = scipy.fft.dctn(zhat, axes=(2, 3), norm="ortho") ** 2
    high = coef[:, :, 8:, :].sum() + coef[:, :, :8, 8:].sum()
    assert r["spectrum"]["high_band_share"] == pytest.approx(high / coef.sum(), rel=1e-10)
    assert r["spectrum"]["high_band_share"] == pytest.approx(0.75, abs=0.02)
    kl = 0.5 * (zn**2 + math.exp(-5) - 1 + 5)
    np.testing.assert_allclose(r["posterior"]["channel_kl"], kl.mean((0, 2, 3)), rtol=1e-10)
    assert r["posterior"]["active_units"] == 4 and r["posterior"]["fraction_at_clamp"] == 0


def test_planted_spot_is_found_with_its_position():
    z, logvar = gaussian_latents(n=20)
    z = z * 0.1
    z[:, :, 3, 5] = 40.0  # every image carries a high-energy spot at (3, 5)
    r = run_stats([(z, logvar)])
    assert r["spots"]["modal_peak_position"] == [3, 5]
    assert r["spots"]["modal_peak_share"] == 1.0
    energy = (z.numpy() ** 2).sum(1).reshape(20, -1)
    assert r["spots"]["concentration_median"] == pytest.approx(np.median(energy.max(1) / energy.sum(1)), rel=1e-12)
    assert r["spots"]["concentration_median"] > 0.9 and r["peaks"]["median"] > 10
    assert r["tails"]["p_abs_gt_6"] > 100 * r["tails"]["gaussian"]["p_abs_gt_6"]
    counts = np.array(r["spots"]["peak_position_counts"])
    assert counts[3, 5] == 20 and counts.sum() == 20


def test_clamped_log_variances_and_a_constant_channel():
    z, logvar = gaussian_latents(n=8)
    logvar[:, 1, :4, :] = -30.0  # a quarter of channel 1 at the clamp
    z[:, 2] = 0.7  # channel 2 carries nothing
    r = run_stats([(z, logvar)])
    assert r["posterior"]["channel_fraction_at_clamp"] == [0.0, 0.25, 0.0, 0.0]
    assert r["posterior"]["fraction_at_clamp"] == 0.25 / 4
    assert r["posterior"]["channel_active"] == [True, True, False, True] and r["posterior"]["active_units"] == 3
    hist = np.array(r["posterior"]["logvar_histogram"])
    assert hist[0] == (logvar == -30).sum().item() and hist.sum() == logvar.numel()


def test_streaming_and_two_processes_equal_one_shot():
    z, logvar = gaussian_latents(n=12)
    z[:, 0] = z[:, 0] * 3 + 1
    one = run_stats([(z, logvar)])
    streamed = run_stats([(z[i:i + 5], logvar[i:i + 5]) for i in range(0, 12, 5)])
    # two "processes": images 0-6 and 7-11; their sums are added as accelerator.reduce(t, "sum") would
    a, b = LatentStatistics(4, tuple(z.shape[2:])), LatentStatistics(4, tuple(z.shape[2:]))
    a.first_pass(z[:7], logvar[:7])
    b.first_pass(z[7:], logvar[7:])
    other = {id(a.sums1): b.sums1, id(b.sums1): a.sums1, id(a.sums_norm): b.sums_norm, id(b.sums_norm): a.sums_norm}
    for s, part in ((a, slice(0, 7)), (b, slice(7, 12))):
        s.finish_first_pass(lambda t: t + other[id(t)])
        s.second_pass(z[part])
    other_tensors = iter([b.logvar_hist, b.peak_positions, b.sums2, b.zhat_hist])
    other_lists = iter([b.concentration, b.peak_zhat])
    a.combine(lambda t: t + next(other_tensors), lambda values: values + next(other_lists))
    two = a.result()
    for r in (streamed, two):
        assert r["images"] == 12
        values_one, values_r = np.array(_numbers(one), dtype=float), np.array(_numbers(r), dtype=float)
        assert values_one.shape == values_r.shape and values_one.size > 100
        np.testing.assert_allclose(values_r, values_one, rtol=1e-9, atol=1e-12)


def _numbers(obj):
    """Every number in a nested result, in a fixed order."""
    if isinstance(obj, dict):
        return [v for k in sorted(obj) for v in _numbers(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _numbers(item)]
    return [obj] if isinstance(obj, (int, float)) else []


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(7)
    torch.testing.assert_close(d @ d.T, torch.eye(7, dtype=torch.float64))
    x = torch.randn(7, dtype=torch.float64)
    np.testing.assert_allclose((d @ x).numpy(), scipy.fft.dct(x.numpy(), norm="ortho"), rtol=1e-10, atol=1e-12)


def test_modal_share_chance_and_tail_survival():
    assert modal_share_by_chance(1, 1024) == 1.0
    assert modal_share_by_chance(5, 1024) == pytest.approx(0.2, abs=0.01)  # five images: five cells, mostly
    assert 1 / 16 < modal_share_by_chance(20000, 16) < 1.1 / 16  # many images: uniform
    z = torch.randn(1_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # not the global RNG
    counts = torch.histc(z.clamp(-12, 12), bins=240, min=-12, max=12).numpy()
    k, survival = zhat_survival(counts, 12.0)
    assert k[0] == 0 and survival[0] == pytest.approx(1.0)
    for threshold in (1, 2, 3):
        assert survival[list(k).index(threshold)] == pytest.approx(math.erfc(threshold / math.sqrt(2)), rel=0.03)


def test_evaluation_crops_follow_the_standard_protocol_unless_told():
    """Short side resized to the resolution, then the centre crop: the crop shows the picture."""
    assert evaluation_data("resolution=64").resize == 64
    assert evaluation_data("resolution=64,resize=").resize is None  # native pixels, on request
    assert evaluation_data("resolution=64,resize=128").resize == 128
    assert "after resizing the short side to 64" in describe(evaluation_data("resolution=64"))


def share_outside_block(vae, z: torch.Tensor, delta: torch.Tensor, row: int, col: int, margin: int) -> float:
    """For one latent (C, h, w): the share of the decoded absolute change, after adding ``delta`` at (row, col),
    that lies outside the (1 + 2 margin)² block of latent cells around it, computed image by image."""
    with torch.no_grad():
        base = vae.decode(z[None]).sample.float()
        perturbed = z.clone()
        perturbed[:, row, col] += delta
        change = (vae.decode(perturbed[None]).sample.float() - base).abs().sum(1)[0]  # (H, W)
    factor = change.shape[-1] // z.shape[-1]
    cells = torch.zeros(z.shape[1:], dtype=torch.bool)
    cells[max(row - margin, 0):row + margin + 1, max(col - margin, 0):col + margin + 1] = True
    inside = cells.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    return (change[~inside].sum() / change.sum()).item()


def test_nonlocality_shares(tiny_vae):
    z = torch.randn(2, 4, 16, 16)
    shares = nonlocality(tiny_vae, z, torch.ones(4), [5, 6], margin=1)
    assert len(shares["peak"]) == len(shares["random"]) == 2
    # the peak share against an independent computation: the latent cell of largest energy, one image at a time
    for i in range(2):
        row, col = divmod(int(z[i].pow(2).sum(0).argmax()), z.shape[-1])
        expected = share_outside_block(tiny_vae, z[i], torch.ones(4), row, col, margin=1)
        assert 0 < expected < 1  # the decoder spreads a cell's change beyond its neighbours, but not all of it
        assert shares["peak"][i] == pytest.approx(expected, rel=1e-4)
    # an image's random position is its seed's, whatever else is in the batch
    alone = nonlocality(tiny_vae, z[1:], torch.ones(4), [6], margin=1)
    assert alone["random"] == pytest.approx(shares["random"][1:], rel=1e-5)
    # with a margin that covers the whole image nothing is outside
    assert nonlocality(tiny_vae, z, torch.ones(4), [5, 6], margin=16)["peak"] == [0.0, 0.0]


def test_psnr_closed_form_identical_images_and_lpips_of_self(images, vgg_file):
    x = images.clamp(-0.8, 0.8)
    m = reconstruction_metrics(x, x + 0.1)  # off by 0.05 in [0, 1] units, everywhere
    assert m["psnr"].tolist() == pytest.approx([10 * math.log10(1 / 0.05**2)] * 2, rel=1e-5)
    same = reconstruction_metrics(images, images, load_lpips(vgg_file, download=False))
    assert same["psnr"].isinf().all() and same["ssim"].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert same["lpips"].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    summary = summarize(same["psnr"].tolist() + m["psnr"].tolist())
    assert summary["exact"] == 2 and summary["images"] == 4 and math.isfinite(summary["mean"])
    assert summarize(same["psnr"].tolist())["mean"] is None  # all exact: no NaN, no crash


def run_eval(script, *args):
    proc = subprocess.run([sys.executable, str(REPO / "eval" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_eval_commands_end_to_end(tiny_vae, images, tmp_path, vgg_file):
    export_autoencoder(tiny_vae, tmp_path / "a", [images], ExportSource("test", "test"))
    torch.manual_seed(1)
    other = type(tiny_vae)(**tiny_vae.config)
    export_autoencoder(other, tmp_path / "b", [images], ExportSource("test", "test"), ExportOptions(single_file=None))
    data = "source=sample,split=all,resolution=32"
    common = ["--data", data, "--num-images", "5", "--batch-size", "2"]
    run_eval("latent_stats.py", "--vae", tmp_path / "a", tmp_path / "a" / "vae_ldm.safetensors", tmp_path / "b",
             *common, "--nonlocality-images", "2", "--out", tmp_path / "stats")
    run_eval("reconstruction.py", "--vae", tmp_path / "a", tmp_path / "b", *common, "--lpips-weights", vgg_file,
             "--worst", "2", "--out", tmp_path / "rec")
    for out, pngs in ((tmp_path / "stats", ["zhat_tails", "peak_positions", "logvar_histogram", "channel_std_kl"]),
                      (tmp_path / "rec", ["worst_vae1", "worst_vae2"])):
        report = json.loads((out / "report.json").read_text())
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["num_images"] == 5 and len(report["vaes"]) == 2 + (out.name == "stats")
        markdown = (out / "report.md").read_text()
        assert "VAE 1" in markdown and "VAE 2" in markdown
        for name in pngs:
            with Image.open(out / f"{name}.png") as image:
                image.verify()
    stats = json.loads((tmp_path / "stats" / "report.json").read_text())["vaes"]
    assert stats[0]["results"]["scale"] == stats[1]["results"]["scale"]  # the folder and its single file
    assert stats[0]["results"]["scale"]["carried_over_implied"] == pytest.approx(1.0, rel=0.5)
    rec = json.loads((tmp_path / "rec" / "report.json").read_text())["vaes"][0]["results"]
    assert len(rec["per_image"]["psnr"]) == 5 and rec["lpips"]["mean"] > 0 and rec["rfid"] is None
    # the figures go into an export's model card (scripts/export.py --eval-report)
    summary = evaluation_summary([json.loads((tmp_path / d / "report.json").read_text()) for d in ("rec", "stats")])
    export_autoencoder(tiny_vae, tmp_path / "carded", [images], ExportSource("test", "test", evaluation=summary))
    card = (tmp_path / "carded" / "README.md").read_text()
    assert "PSNR (dB), 5 images" in card and "std of latent samples" in card and "Not evaluated" not in card


def test_missing_inception_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception.pth"):
        build_fid(str(tmp_path / "inception.pth"), "cpu")


def one_and_two_processes(tmp_path, script: str, *args: str) -> tuple[dict, dict]:
    """Run eval/``script`` with ``args`` in one process and in two (gloo); each run's first VAE results."""
    common = [str(REPO / "eval" / script), *args]
    results = {}
    for name, cmd in (("one", [sys.executable, *common]), ("two", [*launch_command(2), *common])):
        proc = subprocess.run([*cmd, "--out", str(tmp_path / name)], capture_output=True, text=True, env=cpu_env(),
                              timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "report.json").read_text())["vaes"][0]["results"]
    return results["one"], results["two"]


@pytest.mark.slow
def test_latent_stats_two_processes_equal_one(tiny_vae, images, tmp_path):
    export_autoencoder(tiny_vae, tmp_path / "a", [images], ExportSource("test", "test"))
    one, two = one_and_two_processes(tmp_path, "latent_stats.py", "--vae", str(tmp_path / "a"), "--data",
                                     "source=sample,split=all,resolution=32", "--num-images", "9", "--batch-size", "2",
                                     "--nonlocality-images", "2")
    assert one["images"] == two["images"] == 9 and two["nonlocality"]["images"] == 2
    # the same two images, each perturbed at the same random position
    assert one["nonlocality"]["files"] == two["nonlocality"]["files"]
    for key in ("peak", "random"):
        assert one["nonlocality"][key] == pytest.approx(two["nonlocality"][key], rel=1e-4, abs=1e-6), key
    # Other batch compositions run other float32 kernels (~1e-7 relative): an element may cross a
    # histogram bin edge, so histogram counts may differ by a few.
    histograms = {"posterior": "logvar_histogram"}
    for section in ("scale", "tails", "peaks", "spots", "posterior", "spectrum"):
        a, b = ({k: v for k, v in r[section].items() if k != histograms.get(section)} for r in (two, one))
        np.testing.assert_allclose(_numbers(a), _numbers(b), rtol=1e-5, atol=1e-9)
    for a, b in ((two["zhat_histogram"]["counts"], one["zhat_histogram"]["counts"]),
                 (two["posterior"]["logvar_histogram"], one["posterior"]["logvar_histogram"])):
        assert np.abs(np.array(a) - np.array(b)).sum() <= 6


@pytest.mark.slow
def test_eval_scripts_survive_undecodable_images_and_idle_processes(tiny_vae, images, tmp_path):
    """A batch whose only image is corrupt, more processes than images, and data where nothing
    decodes: the first two measure what there is, the last fails with the data named."""
    export_autoencoder(tiny_vae, tmp_path / "vae", [images], ExportSource("test", "test"))
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    spec = f"source=imagefolder,path={folder},resolution=32"
    common = ["--vae", str(tmp_path / "vae"), "--batch-size", "1", "--num-images", "2"]
    env = cpu_env()
    # "two": one process gets only the corrupt file
    for name, cmd in (("one", [sys.executable]), ("two", launch_command(2))):
        proc = subprocess.run([*cmd, str(REPO / "eval" / "latent_stats.py"), *common, "--nonlocality-images", "1",
                               "--data", spec, "--out", str(tmp_path / name)],
                              capture_output=True, text=True, env=env, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / name / "report.json").read_text())
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["vaes"][0]["results"]["images"] == 1
        assert report["skipped_files"] == {"count": 1, "files": [str(folder / "corrupt.jpg")]}
        skipped_line = f"Skipped 1 undecodable file(s): `{folder / 'corrupt.jpg'}`"
        assert skipped_line in (tmp_path / name / "report.md").read_text()
    # More images asked for than there are: said, and measured on what there is.
    proc = run_eval("reconstruction.py", *common[:-2], "--num-images", "5", "--no-lpips", "--data", spec,
                    "--out", tmp_path / "rec")
    assert "asked for 5 images" in proc.stdout + proc.stderr and "holds 2: measuring 2" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rec" / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert (report["images_asked"], report["images_available"], report["num_images"]) == (5, 2, 1)
    assert report["vaes"][0]["results"]["per_image"]["file"] == [str(folder / "good.png")]
    assert report["vaes"][0]["results"]["worst"]["images"] == [str(folder / "good.png")]
    assert "Asked for 5 images; the data holds 2." in (tmp_path / "rec" / "report.md").read_text()
    (folder / "good.png").unlink()
    for script, extra in (("latent_stats.py", ["--nonlocality-images", "1"]), ("reconstruction.py", ["--no-lpips"])):
        proc = subprocess.run([sys.executable, str(REPO / "eval" / script), *common, *extra, "--data", spec,
                               "--out", str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=1800)
        assert proc.returncode == 1 and "error: no decodable image" in proc.stderr and "Traceback" not in proc.stderr


DATA = "source=sample,split=all,resolution=32"


def test_driver_streams_every_image_once_in_id_order(accelerator):
    """The driver hands each batch to the measurement and returns its items sorted by image id."""
    seen = []
    measure = lambda batch: seen.append(len(batch["ids"])) or list(zip(batch["ids"], batch["names"]))  # noqa: E731
    items, skipped = stream_images(accelerator, evaluation_data(DATA), 7, 3, 0, measure)
    assert [i for i, _ in items] == list(range(7)) and seen == [3, 3, 1] and skipped == []
    assert len({name for _, name in items}) == 7


def test_latent_stats_of_a_per_channel_export_compare_per_channel(accelerator, tiny_vae, tmp_path):
    """"carried / implied" of an export calibrated on the same images is 1 in every channel, for
    per_channel as for global (it used to read scaling_factor = 1 alone and report 1/std)."""
    data = evaluation_data(DATA)
    calibration = [b["pixel_values"] for b in calibration_batches(data, 5, 2)]
    for kind in ("global", "per_channel"):
        export_autoencoder(tiny_vae, tmp_path / kind, calibration, ExportSource("test", "sample photos"),
                           ExportOptions(latent_norm=kind, single_file=None))
        vae = evaluation_autoencoder(tmp_path / kind, accelerator.device)
        scale = latent_statistics(vae, accelerator, data, 5, 2, nonlocality_images=0)["scale"]
        assert scale["channel_carried_over_implied"] == pytest.approx([1.0] * 4, rel=1e-4), kind
        assert scale["carried_over_implied"] == pytest.approx(1.0, rel=1e-4)
        assert scale["carried"].startswith("per channel" if kind == "per_channel" else "global")


def truncated_export(vae, images, out: Path) -> Path:
    """An export of ``vae`` whose weight file lost its second half (an interrupted copy); returns that file."""
    export_autoencoder(vae, out, [images], ExportSource("test", "test"))
    weights = out / EXPORT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights


def test_truncated_export_raises_a_checkpoint_error_naming_the_file(tiny_vae, images, tmp_path):
    """diffusers raised three chained errors (safetensors, a UTF-8 decode, its OSError), none of them ours."""
    weights = truncated_export(tiny_vae, images, tmp_path / "vae")
    with pytest.raises(UnreadableWeightsError, match=re.escape(str(weights.resolve()))):
        load_vae(tmp_path / "vae")


@pytest.mark.slow
def test_truncated_export_is_one_error_line_naming_the_file(tiny_vae, images, tmp_path):
    """It printed three tracebacks."""
    weights = truncated_export(tiny_vae, images, tmp_path / "vae")
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "reconstruction.py"), "--vae", str(tmp_path / "vae"),
                           "--no-lpips", "--num-images", "1", "--data", DATA, "--out", str(tmp_path / "rec")],
                          capture_output=True, text=True, timeout=1800)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and str(weights.resolve()) in errors[0] and "truncated" in errors[0]


@pytest.mark.slow
def test_reconstruction_two_processes_equal_one(tiny_vae, images, tmp_path):
    """The driver splits the images over processes and gathers them back in the same order."""
    export_autoencoder(tiny_vae, tmp_path / "vae", [images], ExportSource("test", "test"))
    one, two = one_and_two_processes(tmp_path, "reconstruction.py", "--vae", str(tmp_path / "vae"), "--data", DATA,
                                     "--num-images", "7", "--batch-size", "2", "--no-lpips", "--worst", "3")
    assert one["images"] == two["images"] == 7 and one["per_image"]["file"] == two["per_image"]["file"]
    assert two["per_image"]["psnr"] == pytest.approx(one["per_image"]["psnr"], rel=1e-5)
    assert two["worst"]["images"] == one["worst"]["images"]
