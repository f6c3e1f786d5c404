"""The part of OpenDP fediim uses, as one namespace shaped like ``opendp.prelude``.

``import fediim.privacy.opendp_api as dp`` gives ``dp.m``, ``dp.c``, ``dp.t``, the domains,
metrics and measures below and ``dp.enable_features``, with the ``"contrib"`` features
enabled. The prelude itself also imports OpenDP's extras (scikit-learn, pandas, polars
bindings): about a second per process, paid by every Flower ClientApp message.
"""

import opendp.combinators as c
import opendp.measurements as m
import opendp.transformations as t
from opendp.domains import atom_domain, vector_domain
from opendp.measures import zero_concentrated_divergence
from opendp.metrics import absolute_distance, l2_distance, symmetric_distance
from opendp.mod import Measurement, OpenDPException, Transformation, enable_features

enable_features("contrib")

__all__ = ["Measurement", "OpenDPException", "Transformation", "absolute_distance",
           "atom_domain", "c", "enable_features", "l2_distance", "m", "symmetric_distance",
           "t", "vector_domain", "zero_concentrated_divergence"]
