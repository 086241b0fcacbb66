"""Counterfactual influence: how well classifiers tell imagined trajectories under context c
from those under c + scale * sigma_d * e_d (ROC-AUC of a classifier ensemble, bootstrap CI).

Used by ``dali_jax.analysis.counterfactual`` (procedure in its docstring, step 5).
"""
from __future__ import annotations

import warnings

import numpy as np

from dali_jax.analysis.cf_rollouts import CounterfactualError

__all__ = ["FAST_ADABOOST", "POOL", "auc_score", "influence_auc", "influence_per_dim"]

FAST_ADABOOST = 25
POOL = 8  # pixel trajectories are average-pooled to POOL x POOL x 3 for the classifiers


def auc_score(scores, labels) -> float:
    """ROC-AUC (scikit-learn's); labels 0/1. nan if one class is absent."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, np.float64)))


def _classifiers(fast: bool, seed: int):
    from sklearn.ensemble import AdaBoostClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    mlp = (64, 64) if fast else (1024, 1024)
    return {
        "svc_rbf": make_pipeline(StandardScaler(), SVC(kernel="rbf", gamma="scale")),
        "mlp": make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=mlp, max_iter=50 if fast else 200, random_state=seed)),
        "adaboost": AdaBoostClassifier(n_estimators=FAST_ADABOOST if fast else 200,
                                       random_state=seed),
    }


def _oof_scores(clf, X, y, groups, folds: int, seed: int) -> np.ndarray:
    from sklearn.base import clone
    from sklearn.model_selection import GroupKFold

    out = np.zeros(len(y), np.float64)
    for tr, te in GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, groups):
        m = clone(clf).fit(X[tr], y[tr])
        out[te] = (m.predict_proba(X[te])[:, 1] if hasattr(m, "predict_proba")
                   else m.decision_function(X[te]))
    return out


def influence_auc(X0, X1, fast: bool = False, seed: int = 0, folds: int = 5,
                  n_boot: int = 500, confidence: float = 0.95) -> dict:
    """How well an ensemble separates trajectories X0 (N, F) from their counterfactuals X1.

    Rows i of X0 and X1 come from the same window and stay in one CV fold. -> dict(auc,
    ci_low, ci_high, classifiers={name: auc}, n_pairs)."""
    from scipy.stats import rankdata

    X0, X1 = np.asarray(X0, np.float64), np.asarray(X1, np.float64)
    n = len(X0)
    if n < folds:
        raise CounterfactualError(f"{folds}-fold CV needs at least {folds} windows; got {n}")
    if np.array_equal(X0, X1):  # nothing to separate (e.g. scale 0)
        names = list(_classifiers(True, seed))
        return dict(auc=0.5, ci_low=0.5, ci_high=0.5, classifiers={k: 0.5 for k in names},
                    n_pairs=n, identical=True)
    X = np.concatenate([X0, X1])
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    groups = np.r_[np.arange(n), np.arange(n)]
    per, ranks = {}, []
    from threadpoolctl import threadpool_limits

    # Small problems: one BLAS thread (oversubscribed BLAS threads slow tiny MLP fits 10x).
    limit = 1 if fast or X.size < 2_000_000 else None
    with warnings.catch_warnings(), threadpool_limits(limits=limit):
        warnings.simplefilter("ignore")  # MLP convergence warnings on tiny data
        for name, clf in _classifiers(fast, seed).items():
            s = _oof_scores(clf, X, y, groups, folds, seed)
            per[name] = auc_score(s, y)
            ranks.append(rankdata(s) / len(s))
    ens = np.mean(ranks, axis=0)
    auc = auc_score(ens, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        g = rng.integers(0, n, n)
        idx = np.r_[g, g + n]
        boots.append(auc_score(ens[idx], y[idx]))
    boots = np.asarray(boots)
    a = (1 - confidence) / 2
    lo, hi = np.nanquantile(boots, [a, 1 - a])
    return dict(auc=float(auc), ci_low=float(lo), ci_high=float(hi), classifiers=per,
                n_pairs=n, identical=False)


def _pool(images) -> np.ndarray:
    """(..., 64, 64, 3) -> (..., POOL, POOL, 3) block means."""
    x = np.asarray(images, np.float32)
    h, w, c = x.shape[-3:]
    x = x.reshape(x.shape[:-3] + (POOL, h // POOL, POOL, w // POOL, c))
    return x.mean(axis=(-4, -2))


def _features(agent, dec):
    """Classifier features of decoded rollouts: pooled frames or observation vectors (N, F)."""
    if agent.image_keys:
        x = _pool(dec[agent.image_keys[0]])
    else:
        x = np.concatenate([dec[k] for k in agent.vector_keys], -1)
    return x.reshape(len(x), -1)


def influence_per_dim(agent, imagine, acts, ctx0, sigma, scale, fast, seed, n_boot, log):
    """Baseline rollouts and, per context dimension d, the rollouts under c + scale sigma_d
    e_d and the AUC of telling them apart. -> (baseline, {d: shown window, delta}, AUCs)."""
    base = imagine(acts, ctx0)
    base_feat = _features(agent, base)
    per_dim, aucs = {}, []
    for d in range(ctx0.shape[1]):
        delta = np.zeros(ctx0.shape[1], np.float32)
        delta[d] = scale * sigma[d]
        cf = imagine(acts, ctx0 + delta[None])
        per_dim[d] = dict(decoded={k: v[:1] for k, v in cf.items()}, delta=delta)  # window 0
        a = influence_auc(base_feat, _features(agent, cf), fast=fast, seed=seed, n_boot=n_boot)
        a["dim"] = d
        aucs.append(a)
        log(f"dim {d}: sigma {sigma[d]:.4g} AUC {a['auc']:.3f} "
            f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    return base, per_dim, aucs
