"""Parallelism applied from outside the model (torchtitan style): the device mesh and FSDP2 here; TP, PP and CP
plans join as ``tp.py``, ``pp.py``, ``cp.py`` and take their sub-meshes from :func:`train.parallel.mesh.submesh`."""

from train.parallel.fsdp import apply_ac, apply_compile, apply_fsdp, find_blocks, parallelize
from train.parallel.mesh import MESH_DIMS, MeshError, ParallelDims, build_mesh, setup, submesh

__all__ = [
    "MESH_DIMS",
    "MeshError",
    "ParallelDims",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "build_mesh",
    "find_blocks",
    "parallelize",
    "setup",
    "submesh",
]
