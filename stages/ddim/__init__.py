"""DDIM inversion and sampling (Song et al. 2021) as kinds; the loops every method shares are
:mod:`editflow.stages.ddim_loops`."""

from editflow.stages.ddim.kinds import InvertDdim, SampleDdim

KINDS = (InvertDdim, SampleDdim)
