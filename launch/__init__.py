"""Launching xlserve on Cloud TPU VMs (launch.tpu_vm)."""
