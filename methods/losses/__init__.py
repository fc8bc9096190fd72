"""Losses shared by several methods. A loss used by one method only lives in that method's file."""
from methods.losses.supervised import SupervisedSegmentationLoss

__all__ = ["SupervisedSegmentationLoss"]
