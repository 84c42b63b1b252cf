"""The planner: pure functions from spec + catalogs (+ node inventory) to a plan per GPU pool."""
