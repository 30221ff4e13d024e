"""Slow, plain NumPy float64 versions of the kernels, written from DESIGN.md and the
algorithms' definitions (not from the kernels): every function takes any float inputs and
computes in float64, row by row where that is clearer.

Conventions shared with ``advgrad`` (DESIGN.md section 1, ``advgrad.attacks``):
- a step of norm p moves along sign(G) (inf), G / ||G||_2 (2), or (1) sign(G_i) / q on the
  q coordinates of largest |G_i| (the first index first on ties), 0 elsewhere (SLIDE's
  sparse step; q = 1 the steepest L1 step); a zero gradient row does not move;
- iterative attacks (BIM, PGD, MI-FGSM) start at X_start projected into the ball, then
  repeat: gradient, step of length alpha (negative: descend), projection into the ball,
  clip into [x_min, x_max]; MI-FGSM steps along momentum = decay momentum + G / ||G||_1;
- the projection into the eps-ball is the Euclidean one; the clip comes after it.
"""

from __future__ import annotations

import numpy as np

DEEPFOOL_MARGIN = 1e-4
"""DeepFool steps (|f| + DEEPFOOL_MARGIN) / ||w||_q, just past the linearised boundary."""


def _float64(*arrays):
    return tuple(np.asarray(a, dtype=np.float64) for a in arrays)


def sigmoid(z):
    """1 / (1 + exp(-z)) as exp(-log(1 + exp(-z))), float64: no overflow, full relative
    precision for very negative z too (DeepFool divides by slopes A (1 - A) that small), and
    not the kernels' form."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


def forward(X, W1, b1, W2, b2):
    """A (N, H), logits Z2 (N, C), probabilities P (N, C), all float64."""
    X, W1, b1, W2, b2 = _float64(X, W1, b1, W2, b2)
    A = sigmoid(X @ W1 + b1)
    Z2 = A @ W2 + b2
    shifted = Z2 - Z2.max(axis=1, keepdims=True)
    P = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return A, Z2, P


def loss(X, W1, b1, W2, b2, Y):
    """Per-sample cross-entropy -sum_k Y_k log P_k, float64 (N,)."""
    _, Z2, _ = forward(X, W1, b1, W2, b2)
    shifted = Z2 - Z2.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -(np.asarray(Y, dtype=np.float64) * log_p).sum(axis=1)


def worst_margin(X, labels, W1, b1, W2, b2):
    """min over k != y of Z2_y - Z2_k per row, float64 (N,): > 0 where X is classified y."""
    _, Z2, _ = forward(X, W1, b1, W2, b2)
    rows = np.arange(len(Z2))
    others = Z2.copy()
    others[rows, labels] = -np.inf
    return Z2[rows, labels] - others.max(axis=1)


def input_gradient(X, W1, b1, W2, b2, Y):
    """((P - Y) W2^T * A * (1 - A)) W1^T, float64 (N, d)."""
    A, _, P = forward(X, W1, b1, W2, b2)
    D2 = P - np.asarray(Y, dtype=np.float64)
    D1 = (D2 @ np.asarray(W2, dtype=np.float64).T) * A * (1.0 - A)
    return D1 @ np.asarray(W1, dtype=np.float64).T


def parameter_gradient(X, W1, b1, W2, b2, Y):
    """[dW1 (d, H), db1 (H,), dW2 (H, C), db2 (C,)] of the loss summed over the rows, float64.

    With D2 = P - Y and D1 = (D2 W2^T) * A * (1 - A) per row: dJ/dW1 = x^T D1, dJ/db1 = D1,
    dJ/dW2 = A^T D2, dJ/db2 = D2 (the chain rule through Z1 = X W1 + b1, Z2 = A W2 + b2).
    """
    X, W2 = _float64(X, W2)
    A, _, P = forward(X, W1, b1, W2, b2)
    D2 = P - np.asarray(Y, dtype=np.float64)
    D1 = (D2 @ W2.T) * A * (1.0 - A)
    return [X.T @ D1, D1.sum(axis=0), A.T @ D2, D2.sum(axis=0)]


def direction(G, p, q=1):
    """The step of unit norm p along each row of G, float64: sign(G) for p = inf, G / ||G||_2
    for p = 2; for p = 1, sign(G_i) / q on the q (at most d) coordinates of largest |G_i|,
    the first index first on ties (a stable argsort), 0 elsewhere. A zero row stays zero."""
    (G,) = _float64(G)
    if p == np.inf:
        return np.sign(G)
    if p == 1.0:
        q = min(q, G.shape[1])
        top = np.argsort(-np.abs(G), axis=1, kind="stable")[:, :q]
        out = np.zeros_like(G)
        np.put_along_axis(out, top, np.sign(np.take_along_axis(G, top, axis=1)) / q, axis=1)
        return out
    norms = np.linalg.norm(G, ord=p, axis=1, keepdims=True)
    return np.divide(G, norms, out=np.zeros_like(G), where=norms > 0)


def fgm_step(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, q=1):
    """clip(X + eps * direction_p(G), x_min, x_max) in float64, zero-gradient rows unchanged."""
    G = input_gradient(X, W1, b1, W2, b2, Y)
    return np.clip(np.asarray(X, dtype=np.float64) + eps * direction(G, p, q), x_min, x_max)


def project_l1_ball(v, radius):
    """The point of the L1 ball of ``radius`` around 0 nearest to v (d,) in L2, float64.

    Outside the ball it is the soft threshold sign(v) max(|v| - t, 0) with t >= 0 such that
    its L1 norm f(t) = sum_i max(|v_i| - t, 0) is ``radius`` (the KKT conditions). f is
    piecewise linear and decreasing, with kinks at the |v_i|: find the two neighbouring
    kinks f brackets ``radius`` between, and interpolate linearly between them.
    """
    (v,) = _float64(v)
    size = np.abs(v)
    if size.sum() <= radius:
        return v.copy()
    kinks = np.unique(np.concatenate([[0.0], size]))  # ascending; f(0) > radius, f(max) = 0
    f = np.array([np.maximum(size - t, 0.0).sum() for t in kinks])
    right = np.flatnonzero(f <= radius)[0]
    left = right - 1
    fraction = (f[left] - radius) / (f[left] - f[right])
    t = kinks[left] + fraction * (kinks[right] - kinks[left])
    return np.sign(v) * np.maximum(size - t, 0.0)


def project(X_iter, X, eps, p, x_min, x_max):
    """Each row of X_iter (N, d) moved to its nearest point (in L2) of the eps-ball of norm p
    around the row of X, then clipped to [x_min, x_max]; float64. ``eps``: scalar or (N,).

    inf: each coordinate of the perturbation limited to [-eps, eps]; 2: the perturbation
    scaled down to length eps where longer; 1: ``project_l1_ball``.
    """
    X_iter, X = _float64(X_iter, X)
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), len(X))
    delta = X_iter - X
    if p == np.inf:
        delta = np.clip(delta, -eps[:, None], eps[:, None])
    elif p == 2.0:
        length = np.linalg.norm(delta, axis=1, keepdims=True)
        longer = length > eps[:, None]
        delta = np.where(longer, delta * eps[:, None] / np.where(longer, length, 1.0), delta)
    else:
        delta = np.array([project_l1_ball(row, e) for row, e in zip(delta, eps, strict=True)])
        delta = delta.reshape(X.shape)
    return np.clip(X + delta, x_min, x_max)


def iterate_step(X, X_iter, momentum, W1, b1, W2, b2, Y, eps, alpha, p, decay, x_min, x_max, q=1):
    """One step of BIM/PGD (decay = 0) or MI-FGSM (decay > 0) from the iterate X_iter.

    G = dJ/dX at X_iter; with decay > 0, momentum = decay momentum + G / ||G||_1 (a zero G
    adds nothing) and the step follows the momentum instead of G; then
    X_iter + alpha direction_p(..., q) is projected into the eps-ball around X and clipped.
    ``eps``, ``alpha``: scalars or (N,). Returns (the next iterate, the momentum), float64.
    """
    X_iter, momentum = _float64(X_iter, momentum)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), len(X_iter))
    G = input_gradient(X_iter, W1, b1, W2, b2, Y)
    if decay > 0.0:
        norms = np.abs(G).sum(axis=1, keepdims=True)
        momentum = decay * momentum + np.divide(G, norms, out=np.zeros_like(G), where=norms > 0)
        G = momentum
    moved = X_iter + alpha[:, None] * direction(G, p, q)
    return project(moved, X, eps, p, x_min, x_max), momentum


def iterate(X, W1, b1, W2, b2, Y, X_start, eps, alpha, steps, p, decay, x_min, x_max, q=1):
    """BIM (X_start = X), PGD (X_start any given start) or MI-FGSM (decay > 0): X_start
    projected into the eps-ball around X and clipped, then ``steps`` of ``iterate_step`` from
    a zero momentum. Returns the last iterate, float64 (N, d)."""
    X_iter = project(X_start, X, eps, p, x_min, x_max)
    momentum = np.zeros_like(X_iter)
    for _ in range(steps):
        X_iter, momentum = iterate_step(
            X, X_iter, momentum, W1, b1, W2, b2, Y, eps, alpha, p, decay, x_min, x_max, q
        )
    return X_iter


def logits_and_jacobian(x, W1, b1, W2, b2):
    """Logits z (C,) of one row x (d,) and dz/dx (d, C), float64: dz_k/dx_i =
    sum_j W1_ij sigmoid'(z1_j) W2_jk with sigmoid' = A (1 - A)."""
    x, W1, W2 = _float64(x, W1, W2)
    A, Z2, _ = forward(x[None, :], W1, b1, W2, b2)
    slope = A[0] * (1.0 - A[0])
    return Z2[0], np.einsum("ij,j,jk->ik", W1, slope, W2)


def deepfool(X, W1, b1, W2, b2, p, overshoot, max_iter, x_min, x_max):
    """DeepFool (Moosavi-Dezfooli et al. 2016), multi-class: (X_adv (N, d), iterations (N,)).

    Per row, while the prediction is still the clean one and fewer than ``max_iter``
    iterations ran: linearise the logits at the iterate, and for every other class k take
    w_k = grad z_k - grad z_y and f_k = z_k - z_y; the nearest linearised boundary is the k
    with the smallest |f_k| / ||w_k||_q (q the dual norm of p: 2 for 2, 1 for inf; the first
    on ties; none when every w_k is 0, which stops the row). Add to the total perturbation
    r the step (|f_k| + DEEPFOOL_MARGIN) / ||w_k||_q times w_k / ||w_k||_2 (p = 2) or
    sign(w_k) (p = inf); the iterate is clip(x + (1 + overshoot) r, x_min, x_max).
    """
    (X,) = _float64(X)
    q = 2.0 if p == 2.0 else 1.0
    X_adv = X.copy()
    iterations = np.zeros(len(X), dtype=np.int64)
    for n, x in enumerate(X):
        z, J = logits_and_jacobian(x, W1, b1, W2, b2)
        label = np.argmax(z)
        total = np.zeros_like(x)
        while iterations[n] < max_iter and np.argmax(z) == label:
            others = [k for k in range(len(z)) if k != label]
            w = J[:, others] - J[:, [label]]
            f = z[others] - z[label]
            lengths = np.linalg.norm(w, ord=q, axis=0)
            if not (lengths > 0).any():
                break
            distance = np.full(len(others), np.inf)
            np.divide(np.abs(f), lengths, out=distance, where=lengths > 0)
            k = np.argmin(distance)
            unit = w[:, k] / np.linalg.norm(w[:, k]) if p == 2.0 else np.sign(w[:, k])
            total += (abs(f[k]) + DEEPFOOL_MARGIN) / lengths[k] * unit
            X_adv[n] = np.clip(x + (1.0 + overshoot) * total, x_min, x_max)
            iterations[n] += 1
            z, J = logits_and_jacobian(X_adv[n], W1, b1, W2, b2)
    return X_adv, iterations


def interval_margin_bound(X, labels, eps, p, x_min, x_max, W1, b1, W2, b2):
    """Interval (IBP) lower bound of min over k != y of z_y - z_k over each row's region,
    float64 (N,), in exact arithmetic (no allowance for rounding).

    The region of a row x is x and every clip(x + delta, x_min, x_max) with ||delta||_p <=
    eps. Each input i then lies in [min(x_i, clip(x_i - eps)), max(x_i, clip(x_i + eps))],
    so z1_j = x W1[:, j] + b1[j] lies in [b1_j + sum_i min(W1_ij lo_i, W1_ij hi_i),
    b1_j + sum_i max(...)]; for p = 2 and x inside the clip box, also in
    x W1[:, j] + b1_j +- eps ||W1[:, j]||_2 (Cauchy-Schwarz), and the two intervals are
    intersected. The sigmoid is increasing, so A_j is in [sigmoid(l_j), sigmoid(u_j)], and
    z_y - z_k = b2_y - b2_k + sum_j c_j A_j with c_j = W2_jy - W2_jk is smallest with each
    A_j at the end of its interval that c_j's sign picks.
    """
    X, W1, b1, W2, b2 = _float64(X, W1, b1, W2, b2)
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), len(X))
    out = np.empty(len(X))
    for n, (x, e, y) in enumerate(zip(X, eps, labels, strict=True)):
        lo = np.minimum(x, np.clip(x - e, x_min, x_max))
        hi = np.maximum(x, np.clip(x + e, x_min, x_max))
        low = b1 + np.minimum(W1 * lo[:, None], W1 * hi[:, None]).sum(axis=0)
        high = b1 + np.maximum(W1 * lo[:, None], W1 * hi[:, None]).sum(axis=0)
        if p == 2.0 and ((x >= x_min) & (x <= x_max)).all():
            centre = x @ W1 + b1
            spread = e * np.linalg.norm(W1, axis=0)
            low = np.maximum(low, centre - spread)
            high = np.minimum(high, centre + spread)
        c = W2[:, [y]] - W2  # (H, C): column k holds W2_jy - W2_jk
        ends = np.minimum(c * sigmoid(low)[:, None], c * sigmoid(high)[:, None])
        margins = b2[y] - b2 + ends.sum(axis=0)
        margins[y] = np.inf
        out[n] = margins.min()
    return out


def logits(X, W1, b1, W2, b2):
    """Logits Z2 = A W2 + b2 (N, C), float64."""
    return forward(X, W1, b1, W2, b2)[1]


def loss_value(X, W1, b1, W2, b2, labels, loss, targets=None, kappa=0.0):
    """Per-row loss (N,) float64 of the logits z, each a quantity an attack maximises.

    With s_1 >= s_2 >= ... the logits of a row sorted in descending order:
    "ce": logsumexp(z) - z_y; "dlr": -(z_y - max_{i != y} z_i) / (s_1 - s_3 + 1e-12);
    "dlr-targeted": -(z_y - z_t) / (s_1 - (s_3 + s_4) / 2 + 1e-12); "cw": min(max_{i != y} z_i
    - z_y, kappa), or with targets min(z_t - max_{i != t} z_i, kappa); "logit-difference":
    z_t - z_y. (Croce and Hein 2020, Carlini and Wagner 2017.)
    """
    Z = logits(X, W1, b1, W2, b2)
    rows = np.arange(len(Z))
    labels = np.asarray(labels)

    def best_other(classes):
        others = Z.copy()
        others[rows, classes] = -np.inf
        return others.max(axis=1)

    if loss == "logit-difference":
        return Z[rows, targets] - Z[rows, labels]
    if loss == "ce":
        top = Z.max(axis=1)
        return top + np.log(np.exp(Z - top[:, None]).sum(axis=1)) - Z[rows, labels]
    s = -np.sort(-Z, axis=1)
    if loss == "dlr":
        return -(Z[rows, labels] - best_other(labels)) / (s[:, 0] - s[:, 2] + 1e-12)
    if loss == "dlr-targeted":
        spread = s[:, 0] - (s[:, 2] + s[:, 3]) / 2 + 1e-12
        return -(Z[rows, labels] - Z[rows, targets]) / spread
    if targets is None:
        return np.minimum(best_other(labels) - Z[rows, labels], kappa)
    return np.minimum(Z[rows, targets] - best_other(targets), kappa)
