"""Keys compared on the boards two recordings both have (`model.shared_boards` of the alignment).

Every recording of the mill has its own set of IMU boards plugged in, and a shop may fit others. A key whose
missing board reads as zeros (the channel mean) makes the missing board evidence: rows are pulled to wherever
the training signal of that board is near its mean. Here each key dimension belongs to a group (a board, or
the motor currents, always there), each row has a 0/1 mask over the groups, and the distance of two rows is
the mean squared difference over the dimensions of the groups both have. Pure functions over tensors; the
model keeps the groups and masks as its buffers."""

from __future__ import annotations

import torch


def group_sizes(dim_group: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[groups] how many key dimensions each group has."""
    return torch.bincount(dim_group, minlength=groups).to(dtype)


def row_cost(u: torch.Tensor, um: torch.Tensor, v: torch.Tensor, vm: torch.Tensor, dim_group: torch.Tensor
             ) -> torch.Tensor:
    """[..., k] keys and [..., groups] masks -> [...] the mean squared difference of each pair of rows over the
    dimensions of the groups both have."""
    d, both = (u - v).square(), um * vm
    per_group = d.new_zeros(*d.shape[:-1], both.shape[-1]).index_add_(-1, dim_group, d)
    return (per_group * both).sum(-1) / (both * group_sizes(dim_group, both.shape[-1], d.dtype)).sum(-1).clamp(min=1)


class Reference:
    """The training keys and masks, widened once for `distances`: [-2 s, mask] and each row's square per group."""

    def __init__(self, keys: torch.Tensor, mask: torch.Tensor, dim_group: torch.Tensor):
        self.keys, self.mask, self.dim_group = keys, mask, dim_group
        self.square = keys.new_zeros(len(keys), mask.shape[1]).index_add_(1, dim_group, keys.square())
        self.wide = torch.cat([-2 * keys, mask], 1).T.contiguous()

    def distances(self, q: torch.Tensor, qm: torch.Tensor) -> torch.Tensor:
        """[A, k] keys, [A, groups] masks -> [A, S] `row_cost` against every training row.

        Per mask among the rows (one per recording): |q|^2 over the groups each training row has, plus |s|^2
        over the groups q has, less 2 q.s (a key is zero on a group its row lacks), as one matrix product of
        keys widened by their per-group squares and masks; then over the dimensions both have."""
        sizes = group_sizes(self.dim_group, qm.shape[1], q.dtype)
        masks, which = torch.unique(qm, dim=0, return_inverse=True)
        out = None if len(masks) == 1 else q.new_empty(len(q), len(self.keys))
        for i, m in enumerate(masks):
            rows = torch.nonzero(which == i).flatten()
            q_square = q.new_zeros(len(rows), len(m)).index_add_(1, self.dim_group, q[rows].square())
            d = torch.addmm((self.square @ m)[None], torch.cat([q[rows], q_square], 1), self.wide)
            d = d.div_((self.mask @ (m * sizes)).clamp(min=1)).clamp_(min=0)
            if out is None:  # one set of boards on every row (the usual case): no copy into place
                return d
            out[rows] = d
        return out


def group_basis(keys: torch.Tensor, mask: torch.Tensor, group_of: torch.Tensor, dims: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's principal directions, fitted on the rows that have it (a sample of 20,000), ceil(dims /
    groups) each (dims=0: all its channels). Returns the centre [C], the block basis [C, D] and the group of
    each of the D dimensions."""
    groups = mask.shape[1]
    centre, blocks, dim_group = torch.zeros(keys.shape[1]), [], []
    per = -(-dims // groups) if dims else keys.shape[1]
    g = torch.Generator().manual_seed(0)
    for b in range(groups):
        cols = torch.nonzero(group_of == b).flatten()
        have = torch.nonzero(mask[:, b] > 0).flatten()
        block = torch.zeros(keys.shape[1], min(per, len(cols)))
        if len(cols) and len(have) > 1:
            sample = keys[have[torch.randperm(len(have), generator=g)[:20000]]][:, cols]
            centre[cols] = sample.mean(0)
            v = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)[2][: block.shape[1]].T
            block[cols, : v.shape[1]] = v
        blocks.append(block)
        dim_group += [b] * block.shape[1]
    return centre, torch.cat(blocks, 1), torch.tensor(dim_group, dtype=torch.long)
