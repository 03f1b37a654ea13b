# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · LEEP: how well will a source model transfer?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trm-tutorial/transfer-risk-map/blob/main/notebooks/01_leep.ipynb)
#
# **What you will learn**
# - what the *Log Expected Empirical Prediction* (LEEP, Nguyen et al. 2020; eq. 2 of the paper) measures;
# - how to compute it by hand: the dummy label distribution, the empirical joint and conditional, the
#   expected empirical predictor, the score; and that `trm_utils.leep` gives the same number;
# - that LEEP, computed *before* any fine-tuning, ranks target tasks roughly as fine-tuned accuracy does.
#
# **Compute budget**: about 30 s on 2 CPU cores; a few seconds on a GPU. No data files are needed.
#
# LEEP is the building block of the whole method: notebook 02 applies it to every pixel, notebook 03 turns
# the per-pixel version into a *transfer risk map*, notebook 04 fine-tunes with it.

# %% [markdown]
# ## 0. Setup
# Inside Colab this clones the repository and installs it (never re-pinning Colab's torch); elsewhere it
# only makes sure `trm_utils` is importable from the repository root.

# %%
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/trm-tutorial/transfer-risk-map"  # from pyproject.toml: `make colab-links REPO=owner/name`
_in_repo = any((p / "trm_utils").is_dir() for p in [Path.cwd(), *Path.cwd().parents])
if "google.colab" in sys.modules and not _in_repo:
    if not Path("transfer-risk-map").exists():
        subprocess.run(["git", "clone", "--depth", "1", os.environ.get("TRM_REPO_URL", REPO_URL), "transfer-risk-map"],
                       check=True)
        # torch is a range in pyproject.toml: Colab's own torch is kept, never re-installed
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "transfer-risk-map"], check=True)
    os.chdir("transfer-risk-map/notebooks")
_root = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "trm_utils").is_dir()), None)
if _root is not None and str(_root) not in sys.path:
    sys.path.insert(0, str(_root))

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from scipy.stats import kendalltau

from trm_utils import leep
from trm_utils.notebook import setup

# %% tags=["parameters"]
dataset = "phantom"  # unused here: this notebook makes its own toy problem
data_dir = "data"
output_dir = "runs/notebooks/01_leep"
preset = "tutorial"
seeds = [0, 1, 2]
device = "auto"
iterations = 300  # fine-tuning steps per target task
show_progress = True
n_target_train = 60  # labelled examples per target task

# %%
ctx = setup(dataset, data_dir, output_dir, preset, seeds, device, iterations, show_progress, need_data=False)

# %% [markdown]
# ## 1. A source model and a family of target tasks
#
# Points in the plane come from six Gaussian clusters. The **source task** is to name the cluster
# (six source labels $z$). A small MLP learns it. The **target tasks** label the same kind of points in
# other ways, from closely related to unrelated:
#
# | target | label | relation to the source |
# |---|---|---|
# | `pairs` | cluster // 2 | determined by the source label |
# | `pairs+noise` | same, 25 % labels flipped | mostly determined |
# | `odd/even` | cluster is odd | determined, but a new grouping |
# | `left/right` | x > 0 | partly related |
# | `ring` | distance from the centre > 2.4 | weakly related |
# | `random` | coin flip | unrelated |

# %%
CENTRES = np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, 7)[:-1]]) * 3.0


def sample_points(n, rng):
    z = rng.integers(0, 6, n)
    return (CENTRES[z] + rng.normal(0, 0.9, (n, 2))).astype(np.float32), z


TARGETS = {
    "pairs": lambda x, z, rng: z // 2,
    "pairs+noise": lambda x, z, rng: np.where(rng.random(len(z)) < 0.25, rng.integers(0, 3, len(z)), z // 2),
    "odd/even": lambda x, z, rng: z % 2,
    "left/right": lambda x, z, rng: (x[:, 0] > 0).astype(int),
    "ring": lambda x, z, rng: (np.linalg.norm(x, axis=1) > 2.4).astype(int),
    "random": lambda x, z, rng: rng.integers(0, 2, len(z)),
}


def mlp(out):
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, out))


def fit(model, x, y, steps, lr=1e-2, params=None):
    opt = torch.optim.Adam(params or model.parameters(), lr=lr)
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


torch.manual_seed(ctx.seeds[0])
rng = np.random.default_rng(ctx.seeds[0])
xs, zs = sample_points(2000, rng)
source = fit(mlp(6), xs, zs, 400)
with torch.no_grad():
    xt, zt = sample_points(1000, rng)
    print(f"source accuracy on fresh points: {(source(torch.as_tensor(xt)).argmax(1).numpy() == zt).mean():.3f}")

# %% [markdown]
# ## 2. LEEP step by step
#
# Take one target task and its $n$ labelled examples $(x_i, y_i)$.
#
# **Step 1: the dummy label distribution.** Run the *source* model on the target inputs: $\theta(x_i)$ is a
# probability vector over the source labels $z$. It is called "dummy" because $z$ has nothing to do with
# the target labels yet.

# %%
task = "pairs+noise"
xa, za = sample_points(n_target_train, rng)
ya = TARGETS[task](xa, za, rng)
with torch.no_grad():
    theta = torch.softmax(source(torch.as_tensor(xa)), 1).double().numpy()
n, n_src = theta.shape
n_tgt = int(ya.max()) + 1
print(f"theta: {theta.shape} (n x C_s); rows sum to 1: {np.allclose(theta.sum(1), 1)}")

# %% [markdown]
# **Step 2: the empirical joint** $\hat P(y, z) = \frac1n \sum_{i: y_i = y} \theta(x_i)_z$, and the marginal
# $\hat P(z) = \sum_y \hat P(y, z)$.

# %%
joint = np.zeros((n_tgt, n_src))
for y in range(n_tgt):
    joint[y] = theta[ya == y].sum(axis=0) / n
p_z = joint.sum(axis=0)
print("P(y, z) =\n", joint.round(3), "\nsums to", joint.sum().round(6))

# %% [markdown]
# **Step 3: the empirical conditional** $\hat P(y \mid z) = \hat P(y, z) / \hat P(z)$: "when the source
# says $z$, how often is the target label $y$?" Each column sums to 1.

# %%
cond = joint / p_z
print("P(y | z) =\n", cond.round(3))

# %% [markdown]
# **Step 4: the expected empirical predictor (EEP)** turns the source into a target classifier *without any
# training*: $\hat p(y \mid x) = \sum_z \hat P(y \mid z)\, \theta(x)_z$.
#
# **Step 5: the score** is the EEP's mean log-likelihood of the true target labels (eq. 2):
# $$T = \frac1n \sum_i \log \sum_z \hat P(y_i \mid z)\, \theta(x_i)_z \le 0.$$

# %%
eep = theta @ cond.T  # n x C_t
score_by_hand = np.mean(np.log(eep[np.arange(n), ya]))
score_lib = leep(theta, ya)
print(f"LEEP by hand: {score_by_hand:.6f}   trm_utils.leep: {score_lib:.6f}")
assert abs(score_by_hand - score_lib) < 1e-9

# %% [markdown]
# Two sanity checks follow from the formula: if the source label *determines* the target label and the
# source is certain, the EEP is always right and LEEP = 0; if the source carries no information, LEEP is
# the log-likelihood of guessing by class frequency.

# %%
onehot = np.eye(6)[za]
print("certain source, determined target:", leep(onehot, za // 2))
print("uninformative source:", round(leep(np.full((n, 6), 1 / 6), ya), 4),
      "= sum_y p_y log p_y:", round(float(np.sum(np.bincount(ya) / n * np.log(np.bincount(ya) / n))), 4))

# %% [markdown]
# ## 3. Does LEEP predict fine-tuned accuracy?
#
# For every target task and seed: compute LEEP on the $n$ labelled target examples, then fine-tune the source
# (new head, all layers trained, `iterations` steps) on the same examples and measure accuracy on 2000
# fresh points. A useful transferability score ranks the tasks as the accuracies do.

# %%
rows = []
for seed in ctx.seeds:
    r = np.random.default_rng(1000 + seed)
    for name, label_fn in TARGETS.items():
        x, z = sample_points(n_target_train, r)
        y = label_fn(x, z, r)
        xt, zt = sample_points(2000, r)
        yt = label_fn(xt, zt, r)
        with torch.no_grad():
            th = torch.softmax(source(torch.as_tensor(x)), 1).double().numpy()
        torch.manual_seed(seed)
        model = mlp(6)
        model.load_state_dict(source.state_dict())
        model[-1] = nn.Linear(32, int(max(y.max(), yt.max())) + 1)
        fit(model, x, y, iterations, lr=3e-3)
        with torch.no_grad():
            acc = float((model(torch.as_tensor(xt)).argmax(1).numpy() == yt).mean())
        rows.append({"target": name, "seed": seed, "leep": leep(th, y), "accuracy": acc})
results = pd.DataFrame(rows)
summary = results.groupby("target")[["leep", "accuracy"]].agg(["mean", "std"]).round(3)
summary

# %%
taus = [kendalltau(g.leep, g.accuracy)[0] for _, g in results.groupby("seed")]
print(f"Kendall tau (LEEP vs accuracy) per seed {ctx.seeds}: {np.round(taus, 2)}; mean {np.mean(taus):.2f}")
fig, ax = plt.subplots(figsize=(5.5, 4))
for name, g in results.groupby("target"):
    ax.scatter(g.leep, g.accuracy, label=name)
ax.set_xlabel("LEEP (before fine-tuning)")
ax.set_ylabel("accuracy after fine-tuning")
ax.legend(fontsize=8)
ax.set_title(f"one point per target and seed; mean Kendall tau {np.mean(taus):.2f}")
ctx.save_fig(fig, "leep_vs_accuracy")
ctx.save_table(results, "leep_vs_accuracy")
ctx.save_json({"kendall_tau_per_seed": taus, "seeds": ctx.seeds}, "summary")

# %% [markdown]
# LEEP is not a perfect predictor (tasks with different numbers of classes live on different scales: a
# binary task's LEEP is at least $\log \frac12$ even for a random source), but it orders the tasks from
# "the source already solves it" to "the source knows nothing about it", and it costs one forward pass.
#
# ## Summary
# - LEEP scores a source model for a target task from the source's predictions on the target data alone.
# - It builds a classifier for free, $\sum_z \hat P(y\mid z)\theta(x)_z$, and measures its log-likelihood.
# - It tracks fine-tuned accuracy across tasks; `trm_utils.leep` implements eq. (2) and matches the steps above.
#
# ## Exercises
# 1. Make the source model worse (fewer training steps) and watch LEEP and the accuracies change together.
# 2. Why is LEEP unchanged when you permute the source labels? Check it with `theta[:, perm]`.
# 3. Compare LEEP across tasks with 2 and 3 classes: normalise it by $\log C_t$ and see if the ranking improves.


# %% [markdown]
# ## Checked exercises
# Set each `answer_q…` and run its cell: the check says "correct", or what is wrong (type, shape, which values
# and by how much); `nb01.q1.hint()` and `nb01.q1.solution()` help. Left at `None`, a check says "not
# attempted" and never stops a headless run.

# %%
from trm_utils.exercises import nb01, TOY_THETA, TOY_Y  # noqa: E402,F401 (the exercises' toy data)

print(nb01.q1.prompt)
answer_q1 = None  # your answer: a 2 x 2 array (rows y, columns z)
nb01.q1.check(answer_q1)

# %%
print(nb01.q2.prompt)
answer_q2 = None  # your answer: a float
nb01.q2.check(answer_q2)
