# %% [markdown]
# # The GKL loss: KL, DKL and the generalized form
#
# Notation as in the spec (`shared/GKL_SPEC.md`): `s` = student logits (the adversarial branch in adversarial
# training), `t` = teacher logits (the natural branch, or a frozen teacher in distillation), shape `[B, C]`,
# `d = t - s`. This notebook checks numerically, in float64:
#
# 1. KL and DKL (= wMSE + soft-label CE) have the same gradients with respect to **both** inputs;
# 2. the O(B·C) closed form of GKL's wMSE equals its O(B·C²) pairwise definition;
# 3. where the gradient goes: GKL's wMSE reaches both branches, DKL's only the teacher;
# 4. what `gamma` does to the class-prior weights (prior from a small net trained on Fashion-MNIST);
# 5. how much faster the closed form is.
#
# It runs on CPU in well under a minute. The last cell prints the numbers `tests/test_notebooks.py` checks.

# %%
import io
import json
import time

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to PNG and displayed explicitly
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Image, display

from advgkl import losses

torch.set_num_threads(1)  # small tensors: threads only add noise to the timings
RESULTS = {}  # every number the tests read


def show(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()))


def logits(b, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    t = (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    return s, t


# %% [markdown]
# ## 1. KL and DKL: the same gradients
#
# `KL(softmax(t) || softmax(s)) = sCE(s, t) - H(softmax(t))`. DKL writes its gradient as two terms: the soft-label
# CE (teacher side detached) gives the student KL's gradient, and the wMSE over pairwise logit differences, weighted
# by `softmax(t)` and with the student's differences held constant, gives the teacher KL's gradient. The *values*
# of KL and DKL differ (DKL is a surrogate with the same derivative); their gradients agree to round-off.

# %%
rows, worst = [], 0.0
for b, c, temperature in [(64, 10, 1.0), (32, 100, 1.0), (64, 10, 4.0)]:
    s, t = logits(b, c, seed=c + b)
    kl = losses.kl(s, t, temperature=temperature)
    dkl = losses.dkl(s, t, temperature=temperature)
    p_t = F.softmax(t / temperature, dim=1)
    entropy = -(p_t * F.log_softmax(t / temperature, dim=1)).sum(1).mean()
    sce = losses.soft_ce(s, t, temperature)
    gs_kl, gt_kl = torch.autograd.grad(kl, (s, t))
    gs_dkl, gt_dkl = torch.autograd.grad(dkl, (s, t))
    diff = max((gs_kl - gs_dkl).abs().max().item(), (gt_kl - gt_dkl).abs().max().item())
    worst = max(worst, diff)
    rows.append((b, c, temperature, kl.item(), (sce - entropy).item(), dkl.item(),
                 gt_kl.abs().max().item(), diff))

print(f"{'B':>3} {'C':>4} {'T':>3} {'KL':>10} {'sCE-H(t)':>10} {'DKL':>10} {'max|dKL/dt|':>12} {'max grad diff':>14}")
for r in rows:
    print(f"{r[0]:>3} {r[1]:>4} {r[2]:>3g} {r[3]:>10.6f} {r[4]:>10.6f} {r[5]:>10.6f} {r[6]:>12.3e} {r[7]:>14.2e}")
RESULTS["max_grad_diff_kl_dkl"] = worst
RESULTS["kl_minus_sce_plus_entropy"] = max(abs(r[3] - r[4]) for r in rows)
print(f"max |grad KL - grad DKL| over both inputs = {worst:.2e}")


# %% [markdown]
# ## 2. Closed form = pairwise definition
#
# Per sample, with weights `w` and `S = sum_j w_j`:
# `sum_{j,k} w_j w_k (d_j - d_k)^2 = 2 S sum_j w_j (d_j - mu)^2`, `mu = sum_j w_j d_j / S`.
# `losses.gkl` uses the right-hand side (O(B·C), centred for stability); `losses.gkl_pairwise` builds the
# `[B, C, C]` tensor. Weights are rows of a random class prior raised to `gamma`; `alpha = 4, beta = 20` as in
# the published AT runs.

# %%
def prior_weights(b, c, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    prior = losses.ClassPrior(c)
    y = torch.randint(0, c, (8 * c,), generator=g)
    prior.update(2 * torch.randn(8 * c, c, generator=g, dtype=torch.float64), y)
    prior.finish_epoch()
    return prior.weights(torch.randint(0, c, (b,), generator=g), gamma).double()


worst_value, worst_grad = 0.0, 0.0
for b, c in [(16, 10), (32, 100), (4, 1000)]:
    for gamma in (1.0, 0.4, 0.2):
        s, t = logits(b, c, seed=7 * c + b)
        w = prior_weights(b, c, gamma, seed=c)
        closed = losses.gkl(s, t, w, alpha=4.0, beta=20.0)
        pairwise = losses.gkl_pairwise(s, t, w, alpha=4.0, beta=20.0)
        g_closed = torch.autograd.grad(closed, (s, t))
        g_pair = torch.autograd.grad(pairwise, (s, t))
        worst_value = max(worst_value, abs(closed.item() - pairwise.item()) / abs(pairwise.item()))
        worst_grad = max(worst_grad, *((a - p).abs().max().item() for a, p in zip(g_closed, g_pair)))
RESULTS["max_rel_value_diff_closed_pairwise"] = worst_value
RESULTS["max_grad_diff_closed_pairwise"] = worst_grad
print(f"closed vs pairwise, float64: max relative value difference {worst_value:.2e}, "
      f"max gradient difference {worst_grad:.2e}")

# %% [markdown]
# ## 3. Where the gradient goes
#
# GKL's first change: wMSE is back-propagated into **both** branches. Since it depends on `d = t - s` only, the
# student's gradient is exactly minus the teacher's. In DKL (= KL) the wMSE treats the student's differences as
# constants, so it reaches only the teacher; with a frozen teacher (distillation) it therefore does nothing, and
# KL reduces to the soft-label CE.

# %%
s, t = logits(64, 10, seed=3)
w = F.softmax(t.detach(), dim=1)  # the same per-sample weights for both, to isolate the detach


def grads(loss):
    out = torch.autograd.grad(loss, (s, t), allow_unused=True)
    return [0.0 if g is None else g.norm().item() for g in out], out


terms = {
    "GKL wMSE (alpha=0, beta=1)": losses.gkl(s, t, w, alpha=0.0, beta=1.0),
    "DKL wMSE (alpha=0, beta=1)": losses.gkl(s, t, w, alpha=0.0, beta=1.0, symmetric=False),
    "soft-label CE (alpha=1, beta=0)": losses.gkl(s, t, w, alpha=1.0, beta=0.0),
}
print(f"{'term':<34} {'|grad student|':>15} {'|grad teacher|':>15}")
norms = {}
for name, loss in terms.items():
    (ns, nt), raw = grads(loss)
    norms[name] = (ns, nt, raw)
    print(f"{name:<34} {ns:>15.4e} {nt:>15.4e}")

gs, gt = norms["GKL wMSE (alpha=0, beta=1)"][2]
RESULTS["gkl_wmse_grad_student_norm"] = gs.norm().item()
RESULTS["gkl_wmse_grad_teacher_norm"] = gt.norm().item()
RESULTS["gkl_wmse_student_plus_teacher_grad"] = (gs + gt).abs().max().item()
RESULTS["dkl_wmse_grad_student_norm"] = norms["DKL wMSE (alpha=0, beta=1)"][0]
print(f"GKL wMSE: max |grad_s + grad_t| = {RESULTS['gkl_wmse_student_plus_teacher_grad']:.1e} (equal and opposite)")

# Frozen teacher: DKL's student gradient is the soft-label CE's, i.e. wMSE contributes nothing.
t_frozen = t.detach()
g_dkl = torch.autograd.grad(losses.dkl(s, t_frozen), s)[0]
g_sce = torch.autograd.grad(losses.soft_ce(s, t_frozen), s)[0]
RESULTS["frozen_teacher_dkl_minus_sce_grad"] = (g_dkl - g_sce).abs().max().item()
print(f"frozen teacher: max |grad DKL - grad sCE| = {RESULTS['frozen_teacher_dkl_minus_sce_grad']:.1e}")

# %% [markdown]
# ## 4. What `gamma` does to the class-prior weights
#
# GKL's second change: the pair weights are `prior[y] ** gamma`, where row `c` of the prior is the mean softmax
# (at temperature `T_prior`) of the training samples of class `c`. Here the prior comes from a `tiny_cnn` trained
# for two quick epochs on 6,000 real Fashion-MNIST images. `gamma < 1` flattens each row: the true class
# loses weight to the classes it is confused with, and at `gamma = 0` all pairs count equally. The *effective
# number of classes* `exp(entropy)` of the normalised weights measures that.

# %%
from advgkl.data import dataset_info, load_dataset
from advgkl.models import create_model

torch.manual_seed(0)
info = dataset_info("fashion_mnist")
images, labels = load_dataset("fashion_mnist", train=True)
x_all, y_all = images[:6000].float() / 255, labels[:6000]
model = create_model("tiny_cnn", num_classes=10, in_channels=1, mean=info.mean, std=info.std)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
t0 = time.perf_counter()
for epoch in range(2):
    for i in torch.randperm(len(x_all)).split(100):
        loss = F.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
model.eval()
with torch.no_grad():
    logits_nat = model(x_all)
acc = (logits_nat.argmax(1) == y_all).float().mean().item()
print(f"tiny_cnn: {acc:.1%} train accuracy after {time.perf_counter() - t0:.1f} s")

priors = {}
for t_prior in (1.0, 4.0):
    prior = losses.ClassPrior(10, temperature=t_prior)
    prior.update(logits_nat, y_all)
    prior.finish_epoch()
    priors[t_prior] = prior

gammas = [1.0, 0.4, 0.2, 0.0]
classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def effective_classes(prior, gamma):
    w = prior.prior.pow(gamma)
    p = w / w.sum(1, keepdim=True)
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum(1)).mean().item()


RESULTS["effective_classes"] = {f"T{tp:g}_gamma{g:g}": effective_classes(priors[tp], g)
                                for tp in priors for g in gammas}
for key, value in RESULTS["effective_classes"].items():
    print(f"{key:<14} effective number of classes {value:5.2f}")

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
im = axes[0].imshow(priors[1.0].prior, cmap="viridis")
axes[0].set(title="class prior, T_prior = 1 (row = true class)", xticks=range(10), yticks=range(10))
axes[0].set_xticklabels(classes, rotation=90)
axes[0].set_yticklabels(classes)
fig.colorbar(im, ax=axes[0])
c = classes.index("Shirt")
width = 0.2
for i, g in enumerate(gammas):
    w = priors[1.0].prior[c].pow(g)
    axes[1].bar(torch.arange(10) + (i - 1.5) * width, w / w.sum(), width, label=f"gamma = {g:g}")
axes[1].set(title="normalised weights of class 'Shirt', T_prior = 1", xticks=range(10), yscale="log",
            ylim=(5e-4, 5))  # headroom above the bars for the legend
axes[1].set_xticklabels(classes, rotation=90)
axes[1].legend(ncol=2, fontsize=8, loc="upper center")
grid = torch.linspace(0, 1, 21)
for tp, prior in priors.items():
    axes[2].plot(grid, [effective_classes(prior, g.item()) for g in grid], marker=".", label=f"T_prior = {tp:g}")
axes[2].set(title="effective number of classes vs gamma", xlabel="gamma", ylabel="exp(entropy)")
axes[2].legend()
show(fig)


# %% [markdown]
# ## 5. Timing: closed form vs pairwise
#
# Forward + backward, float32, one CPU thread, median of a few repeats (the full benchmark is
# `benchmarks/bench_losses.py`). The pairwise cost grows with C², the closed form with C.

# %%
def median_ms(fn, s, t, w, repeats):
    times = []
    for _ in range(repeats + 1):  # the first call is a warm-up
        s.grad = t.grad = None
        t0 = time.perf_counter()
        fn(s, t, w, alpha=4.0, beta=20.0).backward()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[1:])[len(times[1:]) // 2]


timing = {}
for b, c in [(128, 10), (128, 100), (32, 1000)]:
    g = torch.Generator().manual_seed(c)
    s = torch.randn(b, c, generator=g).requires_grad_()
    t = torch.randn(b, c, generator=g).requires_grad_()
    w = torch.softmax(torch.randn(b, c, generator=g), 1)
    closed = median_ms(losses.gkl, s, t, w, repeats=7)
    pairwise = median_ms(losses.gkl_pairwise, s, t, w, repeats=3 if c >= 1000 else 7)
    timing[f"B{b}_C{c}"] = {"closed_ms": closed, "pairwise_ms": pairwise, "speedup": pairwise / closed}
    print(f"B={b:<4} C={c:<5} closed {closed:8.3f} ms   pairwise {pairwise:9.3f} ms   "
          f"speedup {pairwise / closed:7.1f}x")
RESULTS["timing"] = timing

fig, ax = plt.subplots(figsize=(6, 3.5))
names = list(timing)
ax.bar([i - 0.2 for i in range(len(names))], [timing[n]["closed_ms"] for n in names], 0.4, label="closed form")
ax.bar([i + 0.2 for i in range(len(names))], [timing[n]["pairwise_ms"] for n in names], 0.4, label="pairwise")
ax.set(xticks=range(len(names)), yscale="log", ylabel="ms (forward + backward)")
ax.set_xticklabels(names)
ax.legend()
show(fig)

# %%
print("NOTEBOOK_RESULTS " + json.dumps(RESULTS))
