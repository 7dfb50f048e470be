"""Annotation formats (ASAP XML, GeoJSON, SlideRunner SQLite) and atomic file writing."""
from ._safe import AnnotationError
from .annotations import EXCLUSION_GROUPS, Annotation, contour_polygons, contours, rasterize
from .asap import asap_xml, detections_to_annotations, read_asap_groups, read_asap_xml, write_asap_xml
from .geojson import geojson_features, read_geojson, write_geojson
from .load import read_annotations
from .sliderunner import SlideRunnerDB, read_sliderunner_points

__all__ = ["AnnotationError", "Annotation", "EXCLUSION_GROUPS", "contour_polygons", "contours", "rasterize",
           "read_annotations", "asap_xml", "detections_to_annotations", "read_asap_xml", "read_asap_groups",
           "write_asap_xml", "geojson_features", "read_geojson",
           "write_geojson", "SlideRunnerDB", "read_sliderunner_points"]
