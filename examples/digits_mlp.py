"""What batch norm is for, shown on a NumPy MLP and scikit-learn's bundled digits data.

Trains the same 64-256-256-10 ReLU network with and without fastbn.BatchNorm after each hidden
layer, at a low and a high learning rate, with plain minibatch SGD and the same initial weights
and batches, then plots the training-loss curves and prints test accuracies:

    python3 examples/digits_mlp.py [--out digits_bn.png] [--epochs 30]

Needs scikit-learn (the data ships with it) and matplotlib for the plot: from a clone of
fastbn, ``python3 -m pip install ".[examples]"`` installs both.
"""
import argparse
import importlib
import sys

import numpy as np

import fastbn

#: The packages this example needs beyond fastbn: (module, distribution, what for).
EXTRAS = (("sklearn", "scikit-learn", "the digits data"), ("matplotlib", "matplotlib", "the plot"))


def require(module):
    """Import one of EXTRAS, or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _, package, purpose = next(e for e in EXTRAS if e[0] == module)
        raise ImportError(
            f"examples/digits_mlp.py needs {package} for {purpose}, which is not installed. "
            f'From a clone of fastbn, install the examples extra: python3 -m pip install '
            f'".[examples]" (or: python3 -m pip install {package})') from exc


class Linear:
    def __init__(self, n_in, n_out, rng):
        self.W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        self.b = np.zeros(n_out, np.float32)

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, dy):
        self.grads = (self.x.T @ dy, dy.sum(axis=0))
        return dy @ self.W.T

    def parameters(self):
        return [self.W, self.b]


class ReLU:
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask

    def parameters(self):
        return []


class BatchNormLayer:
    """fastbn.BatchNorm with the (parameters, grads) protocol of the other layers."""

    def __init__(self, n):
        self.bn = fastbn.BatchNorm(n)

    def forward(self, x):
        return self.bn.forward(x)

    def backward(self, dy):
        dx = self.bn.backward(dy)
        self.grads = (self.bn.grad_gamma, self.bn.grad_beta)
        return dx

    def parameters(self):
        return self.bn.parameters()


def make_mlp(sizes, batchnorm, seed=0):
    """Linear(-BatchNorm)-ReLU blocks and a final Linear; same weights for the same seed."""
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        layers.append(Linear(n_in, n_out, rng))
        if batchnorm:
            layers.append(BatchNormLayer(n_out))
        layers.append(ReLU())
    layers.append(Linear(sizes[-2], sizes[-1], rng))
    return layers


def set_training(layers, training):
    for layer in layers:
        if isinstance(layer, BatchNormLayer):
            layer.bn.train(training)


def forward(layers, x):
    for layer in layers:
        x = layer.forward(x)
    return x


def softmax_cross_entropy(logits, labels):
    """Mean loss and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(len(labels)), labels].mean()
    grad = np.exp(log_p)
    grad[np.arange(len(labels)), labels] -= 1.0
    return float(loss), (grad / len(labels)).astype(np.float32)


def train(layers, X, y, lr, epochs, batch=64, seed=1, max_steps=None):
    """Minibatch SGD; returns the loss of every step (inf once it diverged)."""
    rng = np.random.default_rng(seed)
    losses = []
    set_training(layers, True)
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X) - batch + 1, batch):
            idx = order[start:start + batch]
            loss, grad = softmax_cross_entropy(forward(layers, X[idx]), y[idx])
            if not np.isfinite(loss):
                return losses + [np.inf]
            losses.append(loss)
            for layer in reversed(layers):
                grad = layer.backward(grad)
            for layer in layers:
                for p, g in zip(layer.parameters(), getattr(layer, "grads", ())):
                    p -= lr * g
            if max_steps is not None and len(losses) >= max_steps:
                return losses
    return losses


def accuracy(layers, X, y):
    set_training(layers, False)
    with np.errstate(all="ignore"):
        return float((forward(layers, X).argmax(axis=1) == y).mean())


def load_data(seed=0):
    require("sklearn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)  # pixel intensities 0..16, scaled to 0..1
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(X))
    cut = int(0.8 * len(X))
    return X[order[:cut]], y[order[:cut]], X[order[cut:]], y[order[cut:]]


def run(epochs=30, rates=(0.02, 2.0), sizes=(64, 256, 256, 10)):
    """Train all four variants; returns {(batchnorm, lr): (losses, test accuracy)}."""
    X_train, y_train, X_test, y_test = load_data()
    results = {}
    for lr in rates:
        for batchnorm in (False, True):
            layers = make_mlp(sizes, batchnorm)
            with np.errstate(over="ignore", invalid="ignore"):  # the plain net may diverge
                losses = train(layers, X_train, y_train, lr, epochs)
            results[(batchnorm, lr)] = (losses, accuracy(layers, X_test, y_test))
    return results


def plot(results, path):
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, lr in zip(axes, sorted({lr for _, lr in results})):
        for batchnorm, style in ((False, "C0"), (True, "C1")):
            losses, acc = results[(batchnorm, lr)]
            finite = np.array([v if np.isfinite(v) else np.nan for v in losses])
            label = f"{'with' if batchnorm else 'without'} BatchNorm (test acc {acc:.1%})"
            if not np.isfinite(losses[-1]):
                label += ", diverged"
            ax.plot(finite, style, lw=0.8, label=label)
        ax.set_title(f"SGD, learning rate {lr}")
        ax.set_xlabel("step (minibatch of 64)")
        ax.set_yscale("log")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.legend()
    fig.suptitle("64-256-256-10 ReLU MLP on scikit-learn's digits, same init and batches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="digits_bn.png")
    parser.add_argument("--epochs", type=int, default=30)
    opts = parser.parse_args(argv)
    try:  # both before the training run, not after it
        for module, _, _ in EXTRAS:
            require(module)
    except ImportError as exc:
        sys.exit(f"error: {exc}")
    results = run(epochs=opts.epochs)
    for (batchnorm, lr), (losses, acc) in sorted(results.items(), key=lambda kv: kv[0][::-1]):
        first = np.mean(losses[:20])
        last = np.mean(losses[-20:]) if np.isfinite(losses[-1]) else np.inf
        print(f"lr {lr:<5} {'with' if batchnorm else 'without':>7} BatchNorm: "
              f"loss {first:.3f} -> {last:.4f} over {len(losses)} steps, "
              f"test accuracy {acc:.1%}")
    plot(results, opts.out)
    print(f"saved {opts.out}")


if __name__ == "__main__":
    main()
