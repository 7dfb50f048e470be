"""The real sample images bundled in pyfastscan/data (provenance and licences in
pyfastscan/data/PROVENANCE.md), for the demo and the tests.

    skin_slide_path()        CMU-1-Small-Region, Aperio SVS, skin, 2220 x 2967 px at 0.499 um/px
    carcinoma_image()        TIAToolbox's H&E carcinoma patch, 1000 x 1000 px at about 0.25 um/px
"""
import hashlib
import os

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
SHA256 = {
    "cmu_small_region.svs": "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    "he_carcinoma_1000px.png": "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
}
CARCINOMA_MPP = 0.25  # approximate, from its source's description ("high power")


def sample_path(name: str, verify: bool = False) -> str:
    path = os.path.join(DATA_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"bundled sample {name} is missing from {DATA_DIR}; reinstall pyfastscan")
    if verify:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != SHA256[name]:
                raise ValueError(f"bundled sample {path} is corrupt (sha256 differs from PROVENANCE.md)")
    return path


def skin_slide_path() -> str:
    return sample_path("cmu_small_region.svs")


def carcinoma_image() -> np.ndarray:
    """(1000, 1000, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(sample_path("he_carcinoma_1000px.png")) as im:
        return np.asarray(im.convert("RGB")).copy()
