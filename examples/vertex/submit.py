"""Submit `task.py` (next to this file) as a Vertex AI CustomJob on Spot VMs.

    pip install google-cloud-aiplatform
    python examples/vertex/submit.py --project my-project --region us-central1 \\
        --bucket my-bucket

Without the `google-cloud-aiplatform` package installed (or with
`--dry-run`) it prints the job it would create and exits with status 0;
nothing is sent to Google Cloud.

What makes the job survive Spot preemptions:

- `scheduling_strategy=SPOT`: Spot VMs, preempted with about 30 s notice
  (SIGTERM); `keras_ckpt` saves at the next batch, finishes the upload within
  its 25 s budget and exits with status 143.
- `restart_job_on_worker_restart=True`: Vertex AI restarts the job on a new
  VM; `task.py` resumes from the mirror at the same epoch and batch.
- `base_output_dir`: Vertex AI sets `AIP_CHECKPOINT_DIR=<dir>/checkpoints`
  (the `gs://` mirror `keras_ckpt` resumes from) and `AIP_MODEL_DIR=<dir>/model`
  (where `ExportSavedModel()` writes `saved_model.pb`, ready for
  `aiplatform.Model.upload(artifact_uri=<dir>/model, ...)`).

The job installs `keras-ckpt[gcs]` on top of a prebuilt TensorFlow training
container (keras-ckpt needs TensorFlow >= 2.16 with Keras 3).
"""

import argparse
import os
import pprint
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
                        help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--bucket", default="my-bucket",
                        help="Cloud Storage bucket for staging, checkpoints "
                             "and the model")
    parser.add_argument("--job-name", default="keras-ckpt-spot",
                        help="display name, also the gs://<bucket>/ prefix")
    parser.add_argument("--container-uri",
                        default="us-docker.pkg.dev/vertex-ai/training/"
                                "tf-cpu.2-17.py310:latest",
                        help="prebuilt training container (tf-gpu.2-17.py310 "
                             "for GPUs)")
    parser.add_argument("--machine-type", default="n1-standard-4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=24 * 3600,
                        help="maximum job running time, seconds")
    parser.add_argument("--requirement", default="keras-ckpt[gcs]",
                        help="pip requirement that installs keras_ckpt in the job")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the job instead of submitting it")
    return parser.parse_args(argv)


def job_kwargs(args):
    return dict(
        display_name=args.job_name,
        script_path=os.path.join(HERE, "task.py"),
        container_uri=args.container_uri,
        requirements=[args.requirement],
        args=["--epochs", str(args.epochs), "--save_freq", "200"],
        replica_count=1,
        machine_type=args.machine_type,
        # -> AIP_CHECKPOINT_DIR=<base>/checkpoints, AIP_MODEL_DIR=<base>/model
        base_output_dir=f"gs://{args.bucket}/{args.job_name}",
    )


def run_kwargs(args, spot):
    return dict(
        scheduling_strategy=spot,  # Spot VMs
        restart_job_on_worker_restart=True,  # restart the job after preemption
        timeout=args.timeout,
        sync=True,  # wait for the job; sync=False returns at once
    )


class _Source(str):
    """Printed as is (Python source), not as a quoted string."""

    def __repr__(self):
        return str(self)


def main(argv=None):
    args = parse_args(argv)
    try:
        from google.cloud import aiplatform
        from google.cloud.aiplatform.compat.types import custom_job as gca_custom_job
    except ImportError:
        aiplatform = None
        if not args.dry_run:
            print("The Vertex AI SDK is not installed (pip install "
                  "google-cloud-aiplatform); showing what would be submitted.\n")
        args.dry_run = True

    if args.dry_run:
        print("from google.cloud.aiplatform.compat.types import custom_job "
              "as gca_custom_job")
        print(f"aiplatform.init(project={args.project or '<project>'!r}, "
              f"location={args.region!r}, "
              f"staging_bucket='gs://{args.bucket}/staging')")
        print("job = aiplatform.CustomJob.from_local_script(**"
              + pprint.pformat(job_kwargs(args), sort_dicts=False) + ")")
        spot = _Source("gca_custom_job.Scheduling.Strategy.SPOT")
        print("job.run(**" + pprint.pformat(run_kwargs(args, spot),
                                            sort_dicts=False) + ")")
        return 0

    aiplatform.init(project=args.project, location=args.region,
                    staging_bucket=f"gs://{args.bucket}/staging")
    job = aiplatform.CustomJob.from_local_script(**job_kwargs(args))
    job.run(**run_kwargs(args, gca_custom_job.Scheduling.Strategy.SPOT))
    print(f"job {job.resource_name} finished; model in "
          f"gs://{args.bucket}/{args.job_name}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
