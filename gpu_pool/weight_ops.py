"""The decoder's reads of a weight, whatever form it is bound in: a dense tensor, a
QuantizedTensor, or RowParts of both. The decoder never branches on a weight's format."""

from __future__ import annotations

import torch

from tokenpool.gpu_pool.cpu_ops import linear
from tokenpool.gpu_pool.quant_kernels import embedding_rows, quant_linear
from tokenpool.models.quantized import QuantizedTensor, RowParts


def project(x: torch.Tensor, weight, scratch: torch.Tensor | None,
            quant_scratch: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T. `scratch`: cpu_ops' bf16 upcast buffer; `quant_scratch`: the float32
    buffer a batch-sized quantized matmul dequantizes into."""
    if isinstance(weight, torch.Tensor):
        return linear(x, weight, scratch)
    if isinstance(weight, QuantizedTensor):
        return quant_linear(x, weight, quant_scratch)
    if isinstance(weight, RowParts):
        return torch.cat([project(x, part, scratch, quant_scratch) for part in weight.parts],
                         dim=-1)
    raise TypeError(f"not a weight: {type(weight).__name__}")


def embed(weight, token_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The embedding rows of `token_ids`, in `dtype`."""
    if isinstance(weight, QuantizedTensor):
        return embedding_rows(weight, token_ids, dtype)
    return weight[token_ids]


def per_expert(weight, experts: int):
    """A stack of `experts` equal row blocks, indexable by expert."""
    if isinstance(weight, QuantizedTensor):
        return weight.view_rows(experts, -1)
    return weight.view(experts, -1, weight.shape[-1])
