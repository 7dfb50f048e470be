"""Whole-slide access: open a slide (OpenSlide, or any object with its reading
interface: :class:`SlideReader`) and find its tissue."""
from .reader import Slide, SlideError, SlideReader, open_slide
from .tissue import TissueMask, otsu_tissue_mask

__all__ = ["Slide", "SlideError", "SlideReader", "TissueMask", "open_slide", "otsu_tissue_mask"]
