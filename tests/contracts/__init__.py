"""Behaviour every implementation of an interface must show, subclassed per implementation by the tests."""
