"""Launch `train.py` (next to this file) as a SageMaker managed spot training job.

    pip install sagemaker
    python examples/sagemaker/launch.py --bucket my-bucket \\
        --role arn:aws:iam::123456789012:role/MySageMakerRole

Without the `sagemaker` package installed (or with `--dry-run`) it prints the
estimator it would create and exits with status 0; nothing is sent to AWS.

What makes the job survive spot interruptions:

- `use_spot_instances=True` with `max_wait >= max_run`: managed spot
  training; SageMaker restarts an interrupted job on a new instance.
- `checkpoint_s3_uri`: SageMaker uploads `checkpoint_local_path`
  (`/opt/ml/checkpoints`, where `keras_ckpt.Checkpoint()` writes on
  SageMaker) to S3 during the job, and copies it back before the restarted
  job starts; `train.py` then resumes at the same epoch and batch.
- On the interruption notice SageMaker sends SIGTERM: `keras_ckpt` saves at
  the next batch and exits with status 143 (well within the 2 minutes).

`train.py` is uploaded together with a `requirements.txt` that installs
`keras-ckpt` in the SageMaker TensorFlow container (this script writes both
into a temporary `source_dir`). The model exported to `$SM_MODEL_DIR/1/`
ends up in `<output_path>/<job name>/output/model.tar.gz`, ready for
`estimator.deploy(...)`.
"""

import argparse
import os
import pprint
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bucket", default=None,
                        help="S3 bucket for checkpoints and outputs "
                             "(default: the SageMaker session's default bucket)")
    parser.add_argument("--role", default=os.environ.get("SAGEMAKER_ROLE"),
                        help="IAM role ARN for the job (default: $SAGEMAKER_ROLE, "
                             "else sagemaker.get_execution_role() in SageMaker "
                             "Studio / notebooks)")
    parser.add_argument("--job-name", default="keras-ckpt-spot",
                        help="base job name, also the S3 prefix")
    parser.add_argument("--instance-type", default="ml.g5.xlarge")
    parser.add_argument("--framework-version", default="2.16",
                        help="SageMaker TensorFlow container version "
                             "(keras-ckpt needs TensorFlow >= 2.16, Keras 3)")
    parser.add_argument("--py-version", default="py310")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-run", type=int, default=24 * 3600,
                        help="seconds of training at most")
    parser.add_argument("--max-wait", type=int, default=48 * 3600,
                        help="seconds of training plus waiting for spot "
                             "capacity (>= --max-run)")
    parser.add_argument("--requirement", default="keras-ckpt",
                        help="pip requirement that installs keras_ckpt in the "
                             "container")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the estimator instead of launching it")
    args = parser.parse_args(argv)
    if args.max_wait < args.max_run:
        parser.error("--max-wait must be at least --max-run")
    return args


def estimator_kwargs(args, source_dir, bucket, role):
    prefix = f"s3://{bucket}/{args.job_name}"
    return dict(
        entry_point="train.py",
        source_dir=source_dir,  # train.py + requirements.txt
        role=role,
        instance_count=1,
        instance_type=args.instance_type,
        framework_version=args.framework_version,
        py_version=args.py_version,
        base_job_name=args.job_name,
        # Passed to train.py as --epochs 20 --batch_size 64 --save_freq 200.
        hyperparameters={"epochs": args.epochs, "batch_size": 64,
                         "save_freq": 200},
        # Managed spot training.
        use_spot_instances=True,
        max_run=args.max_run,
        max_wait=args.max_wait,
        # SageMaker syncs checkpoint_local_path <-> checkpoint_s3_uri and
        # restores it after an interruption; keras_ckpt writes there.
        checkpoint_s3_uri=f"{prefix}/checkpoints",
        checkpoint_local_path="/opt/ml/checkpoints",
        # model.tar.gz (the SavedModel exported to $SM_MODEL_DIR) goes here.
        output_path=f"{prefix}/output",
    )


def write_source_dir(directory, requirement):
    shutil.copy(os.path.join(HERE, "train.py"), directory)
    with open(os.path.join(directory, "requirements.txt"), "w") as f:
        f.write(requirement + "\n")


def main(argv=None):
    args = parse_args(argv)
    try:
        import sagemaker
        from sagemaker.tensorflow import TensorFlow
    except ImportError:
        sagemaker = None
        if not args.dry_run:
            print("The SageMaker Python SDK is not installed (pip install "
                  "sagemaker); showing what would be launched.\n")
        args.dry_run = True

    if args.dry_run:
        kwargs = estimator_kwargs(
            args, "<temp dir with train.py and requirements.txt>",
            args.bucket or "<default bucket>",
            args.role or "<SageMaker execution role ARN>")
        print("estimator = sagemaker.tensorflow.TensorFlow(**"
              + pprint.pformat(kwargs, sort_dicts=False) + ")")
        print("estimator.fit()  # synthetic data; with real data: "
              'estimator.fit({"train": "s3://my-bucket/data/train"})')
        print(f"\nrequirements.txt: {args.requirement}")
        return 0

    with tempfile.TemporaryDirectory(prefix="keras-ckpt-sagemaker-") as source_dir:
        write_source_dir(source_dir, args.requirement)
        session = sagemaker.Session()
        bucket = args.bucket or session.default_bucket()
        role = args.role or sagemaker.get_execution_role()
        kwargs = estimator_kwargs(args, source_dir, bucket, role)
        estimator = TensorFlow(sagemaker_session=session, **kwargs)
        start = time.monotonic()
        estimator.fit()  # uploads source_dir, then waits for the job
        print(f"job {estimator.latest_training_job.name} finished in "
              f"{time.monotonic() - start:.0f} s")
        print(f"model: {estimator.model_data}")
        print("deploy it with: estimator.deploy(initial_instance_count=1, "
              'instance_type="ml.c5.xlarge")')
    return 0


if __name__ == "__main__":
    sys.exit(main())
