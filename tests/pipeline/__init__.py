"""Tests of the control plane, one folder per subpackage."""
