"""Sensors: new demonstrations (new_demos_sensor) and regressions / failed gates (regression_sensor)."""

from sensors.demos_sensor import new_demos_sensor
from sensors.regression_sensor import regression_sensor

__all__ = ["new_demos_sensor", "regression_sensor"]
