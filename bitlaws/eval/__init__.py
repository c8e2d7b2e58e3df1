"""Evaluation metrics: Frechet distance (FID), Inception Score, feature statistics."""

from bitlaws.eval.frechet import frechet_distance
from bitlaws.eval.inception_score import inception_score
from bitlaws.eval.sharded import accumulate_features
from bitlaws.eval.stats import FeatureStats

__all__ = ["frechet_distance", "inception_score", "FeatureStats", "accumulate_features"]
from bitlaws.eval.fid import compute_fid, fid_from_stats, inception_stats

__all__ += ["compute_fid", "fid_from_stats", "inception_stats"]
