"""Model FLOPs of a training step, and the matrix-multiply peak they are compared with.

Useful model FLOPs (the same definition for softpo and TRL, so FLOP utilisation ratios equal speed
ratios; work a framework adds beyond this, e.g. output-layer logits at prompt positions, is not
counted as useful). For one forward over a row of `t` real tokens of which `s` are scored:

    F_fwd(t, s) = 2 * N_body * t  +  4 * L * d * (t^2 / 2)  +  2 * d * V * s

N_body: the weights of all matrix multiplies except the token/position embeddings; the attention
term counts QK^T and AV over the causal half (t^2/2 pairs, 2 FLOPs per multiply-add, two products);
the last term is the output layer on the scored positions only (the predecessors of response tokens).
With the shared-prompt layout the prompt is counted once (the FLOPs that layout really needs).
Training multiplies the forward by 3 (forward + backward for activations + backward for weights); a
LoRA run by 2 (frozen weights get no weight gradient; the adapters are negligible). A reference forward
or a sampling pass is 1x. Padding tokens are not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    n_body: int  # matmul weights outside the embeddings
    n_layer: int
    d_model: int
    vocab: int

    @staticmethod
    def of(model) -> "Shape":
        from torch import nn

        inner = getattr(model, "get_base_model", lambda: model)()
        embeddings = {id(m.weight) for m in inner.modules() if isinstance(m, nn.Embedding)}
        head = inner.get_output_embeddings()
        skip = embeddings | {id(head.weight)}
        n_body = sum(p.numel() for n, p in inner.named_parameters()
                     if p.ndim == 2 and id(p) not in skip and "lora_" not in n)
        cfg = inner.config
        return Shape(n_body, cfg.num_hidden_layers, cfg.hidden_size, head.weight.shape[0])

    def forward(self, tokens: int, scored: int, attention_pairs: float | None = None) -> float:
        """One forward; `attention_pairs` (query, key) defaults to the causal t^2 / 2."""
        pairs = tokens ** 2 / 2 if attention_pairs is None else attention_pairs
        return 2.0 * self.n_body * tokens + 4.0 * self.n_layer * self.d_model * pairs + \
            2.0 * self.d_model * self.vocab * scored


def pair_flops(shape: Shape, prompt: int, responses: list[int], train_factor: float,
               reference: bool, shared_prompt: bool = False) -> float:
    """One example: policy training (+ a reference forward). Each response is its own row
    `[prompt, response]`, or with `shared_prompt` one row `[prompt, response_1, ..., response_n]`
    where the prompt is computed once and each response attends to the prompt and to itself."""
    if shared_prompt:
        tokens = prompt + sum(responses)
        pairs = prompt ** 2 / 2 + sum(r * prompt + r ** 2 / 2 for r in responses)
        fwd = shape.forward(tokens, sum(responses), pairs)
    else:
        fwd = sum(shape.forward(prompt + r, r) for r in responses)
    return fwd * (train_factor + (1.0 if reference else 0.0))


def regularizer_flops(shape: Shape, prompt_lengths: list[int], sample_lengths: list[int],
                      train_factor: float, sampled: bool) -> float:
    """SPO's global KL on fresh samples: drawing them (a forward, KV-cached), the reference's states and
    output layer at the sampled positions (token estimator), and the policy's training forward."""
    total = 0.0
    for p, s in zip(prompt_lengths, sample_lengths):
        row = shape.forward(p + s, s)
        total += row * train_factor + row  # policy training + reference (states and head)
        if sampled:
            total += row  # generate(): prompt once, then one token at a time with the KV cache
    return total


def matmul_peak(dtype_name: str, seconds: float = 3.0, sizes=(512, 1024, 2048, 3072),
                device: str = "cpu") -> tuple[float, float]:
    """Best GFLOP/s of torch.matmul and of F.linear (the kernel nn.Linear and autocast use, which
    can differ) over square sizes, in this process's thread settings: per wall-clock second, and per
    second of CPU time divided by the thread count (what the cores did while this process ran; less
    sensitive to other processes sharing the machine). A size whose single product takes over a
    second is the last tried (bf16 without hardware support is slow). On a GPU: sizes up to 8192,
    synchronised, and the second figure equals the first."""
    import torch

    if device == "cuda":
        return _cuda_matmul_peak(dtype_name, seconds)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ops = {"matmul": lambda a, b: a @ b, "linear": torch.nn.functional.linear}
    threads = torch.get_num_threads()
    best_wall = best_cpu = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        slow = False
        for op in ops.values():
            start = time.perf_counter()
            op(a, b)  # warm-up (allocations, kernel choice)
            slow |= time.perf_counter() - start > 1.0
            start, cpu, k = time.perf_counter(), time.process_time(), 0
            while True:
                op(a, b)
                k += 1
                elapsed = time.perf_counter() - start
                if elapsed > seconds / 8:
                    break
            flop = 2.0 * n ** 3 * k / 1e9
            best_wall = max(best_wall, flop / elapsed)
            best_cpu = max(best_cpu, flop / max((time.process_time() - cpu) / threads, 1e-9))
        if slow:
            break
    return best_wall, best_cpu


def _cuda_matmul_peak(dtype_name: str, seconds: float) -> tuple[float, float]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the benchmark's runs
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best = 0.0
    for n in (2048, 4096, 8192):
        a, b = (torch.randn(n, n, dtype=dtype, device="cuda") for _ in range(2))
        for op in (lambda: a @ b, lambda: torch.nn.functional.linear(a, b)):
            op()
            torch.cuda.synchronize()
            start, k = time.perf_counter(), 0
            while time.perf_counter() - start < seconds / 6:
                for _ in range(10):
                    op()
                k += 10
                torch.cuda.synchronize()
            best = max(best, 2.0 * n ** 3 * k / 1e9 / (time.perf_counter() - start))
    return best, best
