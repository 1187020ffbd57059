from gpu_provisioner.cli import app

app(prog_name="gpu-provisioner")
