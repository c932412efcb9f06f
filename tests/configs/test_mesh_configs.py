"""Every configs/mesh/*.gin parses with the demo config and builds a mesh over the 8 fake
devices."""

import glob
import math
import os

import gin
import pytest

from lcjax.config import parse_gin
from lcjax.parallel.mesh import MeshConfig, make_mesh
from tests.train.runs import DEMO_GIN, REPO

MESH_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "mesh", "*.gin")))


@pytest.mark.parametrize("path", MESH_CONFIGS, ids=os.path.basename)
def test_mesh_config_builds_on_eight_devices(path):
  gin.clear_config()
  try:
    parse_gin([DEMO_GIN, path], [])
    mesh = make_mesh(MeshConfig())
  finally:
    gin.clear_config()
  assert math.prod(mesh.shape.values()) == 8


def test_gpu_host_shards_parameters_over_every_device():
  gin.clear_config()
  try:
    parse_gin([DEMO_GIN, os.path.join(REPO, "configs", "mesh", "gpu_host.gin")], [])
    mesh = make_mesh(MeshConfig())
  finally:
    gin.clear_config()
  assert mesh.shape["fsdp"] == 8 and mesh.shape["data"] == 1
