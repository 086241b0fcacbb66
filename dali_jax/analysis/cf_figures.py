"""Counterfactual figures: pixel strips and GIFs, feature heatmaps and time series, the
influence AUC per dimension and the physical check (file names in
``dali_jax.analysis.counterfactual``'s docstring).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dali_jax.analysis.cf_rollouts import CONTROL_DT
from dali_jax.analysis.plots import pyplot, save

__all__ = ["write_outputs", "plot_auc", "plot_check"]


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _write_pixel_outputs(out: Path, d: int, base, cf, frames: int, fps: float) -> list[str]:
    from PIL import Image

    H = base.shape[0]
    diff = (base - cf + 1.0) / 2.0
    pick = np.unique(np.linspace(0, H - 1, min(frames, H)).round().astype(int))
    rows = [np.concatenate(list(_to_uint8(x[pick])), axis=1) for x in (base, cf, diff)]
    strip = out / f"strip_dim{d}.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(strip)
    gif_frames = []
    for t in range(H):
        f = np.concatenate([_to_uint8(base[t]), _to_uint8(cf[t]), _to_uint8(diff[t])], axis=1)
        f = f.repeat(2, axis=0).repeat(2, axis=1)
        gif_frames.append(Image.fromarray(f))
    gif = out / f"cf_dim{d}.gif"
    gif_frames[0].save(gif, save_all=True, append_images=gif_frames[1:],
                       duration=max(1, int(round(1000 / fps))), loop=0)
    return [strip.name, gif.name]


def _write_feature_outputs(out: Path, d: int, base, cf, scale: float, sigma: float,
                           labels: Sequence[str]) -> list[str]:
    plt = pyplot()
    H, Do = base.shape
    diff = base - cf
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.12 * H + 2), 2.0 + 0.35 * Do * 3 / 2),
                             sharex=True)
    vmin, vmax = float(min(base.min(), cf.min())), float(max(base.max(), cf.max()))
    lim = float(np.abs(diff).max()) or 1e-12
    for ax, arr, title, kw in (
            (axes[0], base, "baseline", dict(vmin=vmin, vmax=vmax, cmap="viridis")),
            (axes[1], cf, f"counterfactual (dim {d} + {scale:g} sigma = {scale * sigma:+.3g})",
             dict(vmin=vmin, vmax=vmax, cmap="viridis")),
            (axes[2], diff, f"difference baseline - counterfactual (max |diff| "
                            f"{float(np.abs(diff).max()):.3g})",
             dict(vmin=-lim, vmax=lim, cmap="RdBu_r"))):
        im = ax.imshow(arr.T, aspect="auto", interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(Do))
        ax.set_yticklabels(labels, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[2].set_xlabel("imagined step")
    strip = save(fig, out / f"strip_dim{d}.png", dpi=100)

    cols = min(4, Do)
    rws = int(np.ceil(Do / cols))
    fig, axes = plt.subplots(rws, cols, figsize=(3.2 * cols, 2.2 * rws), squeeze=False)
    t = np.arange(1, H + 1)
    for i in range(rws * cols):
        ax = axes[i // cols][i % cols]
        if i >= Do:
            ax.axis("off")
            continue
        ax.plot(t, base[:, i], label="baseline", lw=1.5)
        ax.plot(t, cf[:, i], "--", label="counterfactual", lw=1.5)
        ax.set_title(labels[i], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"context dim {d} shifted by {scale:g} sigma", fontsize=9)
    ts = save(fig, out / f"timeseries_dim{d}.png", dpi=100)
    return [strip.name, ts.name]


def plot_auc(path: Path, aucs: Sequence[dict], chosen: int):
    """Bar chart of the influence AUC per dimension with its CI (`influence_auc` dicts), the
    shown dimension `chosen` in red."""
    plt = pyplot()
    n = len(aucs)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 3.0))
    x = np.arange(n)
    est = np.array([a["auc"] for a in aucs])
    err = np.array([[a["auc"] - a["ci_low"] for a in aucs], [a["ci_high"] - a["auc"]
                                                              for a in aucs]])
    ax.bar(x, est, yerr=np.maximum(err, 0), capsize=3,
           color=["tab:red" if i == chosen else "tab:blue" for i in range(n)])
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_ylim(0.0, 1.05)
    ax.set_xticks(x)
    ax.set_xlabel("context dimension")
    ax.set_ylabel("influence ROC-AUC")
    save(fig, path, dpi=100)


def plot_check(path: Path, scales, accel, dim: int, rho: float):
    """Imagined ball acceleration accel (starts, S) against the shift scales (S,) of `dim`,
    one grey line per start and their mean in red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    s = np.asarray(scales)
    for row in accel:
        ax.plot(s, row, color="0.7", lw=0.6)
    ax.plot(s, accel.mean(0), "o-", color="tab:red", label="mean over windows")
    ax.set_xlabel(f"shift of context dim {dim} (sigma)")
    ax.set_ylabel("imagined ball z acceleration (m/s^2)")
    ax.set_title(f"Spearman rho = {rho:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path, dpi=100)


def write_outputs(agent, task_name, out_dir, base, per_dim, dims, ctx0, picks, scale, sigma,
                  frames) -> list:
    """Images (pixel strips and GIFs, or feature plots) and decoded_dim{d}.npz of the shown
    window for each of `dims`. -> file names."""
    files, obs_labels = [], []
    vec_keys = list(agent.vector_keys)
    if not agent.image_keys:
        for k in vec_keys:
            n = base[k].shape[-1]
            names = (["cup x", "cup z", "ball x", "ball z", "cup vx", "cup vz", "ball vx",
                      "ball vz"] if task_name == "ball_in_cup" and k == "obs" and n == 8
                     else [f"{k}[{i}]" for i in range(n)])
            obs_labels += names
    for d in dims:
        if agent.image_keys:
            key = agent.image_keys[0]
            b, c = base[key][0], per_dim[d]["decoded"][key][0]
            files += _write_pixel_outputs(out_dir, d, b, c, frames,
                                          fps=1.0 / CONTROL_DT.get(task_name, 0.05) / 5)
        else:
            b = np.concatenate([base[k][0] for k in vec_keys], -1)
            c = np.concatenate([per_dim[d]["decoded"][k][0] for k in vec_keys], -1)
            files += _write_feature_outputs(out_dir, d, b, c, scale, float(sigma[d]),
                                            obs_labels)
        npz = out_dir / f"decoded_dim{d}.npz"
        np.savez_compressed(npz, baseline=b, counterfactual=c, difference=b - c,
                            context=ctx0[0], delta=per_dim[d]["delta"],
                            window=np.array([picks[0][0], picks[0][1]]))
        files.append(npz.name)
    return files
