"""Triton kernels of fastcur, installed as the subpackage `fastcur.triton_kernels`."""
