"""Compute: a NAT-free VPC, AWS Batch environments and queues, and the train and search job definitions.

Cost choice (see docs/DEPLOY.md): public subnets only, no NAT gateway and no interface endpoints.
Batch instances and Fargate tasks get public IPs so they can reach ECR, CloudWatch Logs and STS; the
security group admits no inbound traffic and lets out HTTPS only. S3 and DynamoDB traffic goes through
the free gateway endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, Size
from aws_cdk import aws_batch as batch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.access import (
    ECS_INSTANCE_POLICY,
    acknowledge_managed_policy,
    acknowledge_run_objects,
    acknowledge_unscoped,
    list_bucket,
    read_runs,
    write_runs,
)
from infra.images import SEARCH_DOCKERFILE, TRAIN_DOCKERFILE, batch_image
from infra.logs import log_group
from infra.settings import DeploySettings
from topx.contract import BATCH_RETRY_STRATEGIES, SEARCH_COMMAND, TRAIN_COMMAND

# The job definitions run the contract's commands (`python -m batch_jobs.<job>.main ...`); the Dockerfiles'
# CMDs name the same modules (checked in tests). Batch fills `Ref::<name>` from the SubmitJob parameters
# the state machine sends: bucket and run_id, plus shards for search. The shard index itself comes from
# AWS_BATCH_JOB_ARRAY_INDEX, set by Batch on every array child.

# The train container fits the smallest default GPU instances (g5.xlarge / g6.xlarge: 4 vCPU, 16 GiB,
# of which ECS keeps some for itself). Larger instance types also fit it.
TRAIN_VCPUS = 4
TRAIN_MEMORY = Size.gibibytes(14)
TRAIN_TIMEOUT = Duration.hours(6)
# A Fargate size (4 vCPU allows 8-30 GiB); one array child holds all item vectors and its users' vectors.
SEARCH_VCPUS = 4
SEARCH_MEMORY = Size.gibibytes(16)
SEARCH_TIMEOUT = Duration.hours(2)
GPU_ROOT_VOLUME_GIB = 100


# The user the train image runs as (batch_jobs/train/Dockerfile: useradd --uid).
TRAIN_JOB_UID = 10001
INSTANCE_METADATA_ADDRESS = "169.254.169.254"


def block_metadata_command(uid: int) -> str:
    """The shell command that drops user ``uid``'s packets to the instance metadata service."""
    return (f"iptables --insert OUTPUT --destination {INSTANCE_METADATA_ADDRESS} --match owner "
            f"--uid-owner {uid} --jump DROP")


@dataclass(frozen=True)
class Job:
    queue: batch.JobQueue
    definition: batch.EcsJobDefinition


class Compute(Construct):
    """The VPC, a GPU managed EC2 environment for training and a Fargate environment for search."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploySettings,
        bucket: s3.IBucket,
        log_bucket: s3.IBucket,
        environment: dict[str, str],
        logs_key: kms.IKey,
    ) -> None:
        super().__init__(scope, construct_id)
        self._logs_key = logs_key
        self.vpc = self._vpc(log_bucket)
        self.security_group = ec2.SecurityGroup(
            self,
            "JobSecurityGroup",
            vpc=self.vpc,
            description="topx Batch jobs: no inbound; HTTPS out to ECR, S3, DynamoDB, CloudWatch Logs, STS",
            allow_all_outbound=False,
        )
        self.security_group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS to AWS APIs")
        subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC)

        gpu_environment = batch.ManagedEc2EcsComputeEnvironment(
            self,
            "GpuEnvironment",
            vpc=self.vpc,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            instance_types=[ec2.InstanceType(name) for name in settings.gpu_instance_types],
            use_optimal_instance_classes=False,
            images=[batch.EcsMachineImage(image_type=batch.EcsMachineImageType.ECS_AL2023_NVIDIA)],
            minv_cpus=0,
            maxv_cpus=settings.max_vcpus,
            spot=settings.spot,
            allocation_strategy=(
                batch.AllocationStrategy.SPOT_PRICE_CAPACITY_OPTIMIZED
                if settings.spot
                else batch.AllocationStrategy.BEST_FIT_PROGRESSIVE
            ),
            launch_template=self._gpu_launch_template(),
            update_to_latest_image_version=True,
        )
        acknowledge_managed_policy(gpu_environment, ECS_INSTANCE_POLICY)
        cpu_environment = batch.FargateComputeEnvironment(
            self,
            "CpuEnvironment",
            vpc=self.vpc,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            maxv_cpus=settings.max_vcpus,
            spot=settings.spot,
        )

        # What the compute health check asks Batch about (topx.aws.health).
        self.environments: tuple[batch.IComputeEnvironment, ...] = (gpu_environment, cpu_environment)
        job_role = self._job_role(bucket)
        self.train = Job(
            queue=self._queue("TrainQueue", gpu_environment),
            definition=batch.EcsJobDefinition(
                self,
                "TrainJob",
                container=batch.EcsEc2ContainerDefinition(
                    self,
                    "TrainContainer",
                    image=batch_image(TRAIN_DOCKERFILE, settings.base_image_digest("train")),
                    cpu=TRAIN_VCPUS,
                    memory=TRAIN_MEMORY,
                    gpu=1,
                    command=list(TRAIN_COMMAND),
                    environment=environment,
                    job_role=job_role,
                    logging=self._logging("train"),
                    # PyTorch data loader workers exchange batches through /dev/shm.
                    linux_parameters=batch.LinuxParameters(
                        self, "TrainLinuxParameters", shared_memory_size=Size.gibibytes(2)
                    ),
                ),
                parameters={"bucket": bucket.bucket_name},
                timeout=TRAIN_TIMEOUT,
                retry_attempts=BATCH_RETRY_STRATEGIES["train"]["attempts"],
                retry_strategies=_retry_strategies("train"),
                propagate_tags=True,
            ),
        )
        self.search = Job(
            queue=self._queue("SearchQueue", cpu_environment),
            definition=batch.EcsJobDefinition(
                self,
                "SearchJob",
                container=batch.EcsFargateContainerDefinition(
                    self,
                    "SearchContainer",
                    image=batch_image(SEARCH_DOCKERFILE, settings.base_image_digest("search")),
                    cpu=SEARCH_VCPUS,
                    memory=SEARCH_MEMORY,
                    command=list(SEARCH_COMMAND),
                    environment=environment,
                    job_role=job_role,
                    logging=self._logging("search"),
                    assign_public_ip=True,
                    fargate_platform_version=ecs.FargatePlatformVersion.LATEST,
                ),
                parameters={"bucket": bucket.bucket_name, "shards": str(settings.shards)},
                timeout=SEARCH_TIMEOUT,
                retry_attempts=BATCH_RETRY_STRATEGIES["search"]["attempts"],
                retry_strategies=_retry_strategies("search"),
                propagate_tags=True,
            ),
        )

        for container in (self.train.definition.container, self.search.definition.container):
            # The execution role CDK makes for pulling the image and writing the job's log group.
            acknowledge_unscoped(container, ["ecr:GetAuthorizationToken"])

    @property
    def jobs(self) -> tuple[Job, Job]:
        return (self.train, self.search)

    def _vpc(self, log_bucket: s3.IBucket) -> ec2.Vpc:
        vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=22)
            ],
            restrict_default_security_group=False,
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                "DynamoDB": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.DYNAMODB),
            },
        )
        vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_s3(log_bucket, "vpc-flow-logs/"),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )
        return vpc

    def _gpu_launch_template(self) -> ec2.LaunchTemplate:
        # AWS Batch runs EC2 jobs with host networking, where a hop limit of 1 does not keep a container
        # from the instance metadata service (and the instance role's credentials): the container's
        # packets leave from the host's own network stack. The train image runs as TRAIN_JOB_UID, so
        # the host drops that user's packets to the metadata address; jobs use their job role through
        # the ECS credential endpoint (169.254.170.2), which stays open.
        commands = ec2.UserData.for_linux()
        commands.add_commands(block_metadata_command(TRAIN_JOB_UID))
        user_data = ec2.MultipartUserData()  # AWS Batch reads launch-template user data in MIME parts
        user_data.add_user_data_part(commands, ec2.MultipartBody.SHELL_SCRIPT, True)
        return ec2.LaunchTemplate(
            self,
            "GpuLaunchTemplate",
            # IMDSv2 only, and one hop: a process in a bridged container could not reach it either.
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            http_endpoint=True,
            http_put_response_hop_limit=1,
            user_data=user_data,
            # The CUDA PyTorch image is several GB unpacked; the AMI's default root volume is 30 GiB.
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        GPU_ROOT_VOLUME_GIB,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )

    def _queue(self, construct_id: str, environment: batch.IComputeEnvironment) -> batch.JobQueue:
        return batch.JobQueue(
            self,
            construct_id,
            compute_environments=[batch.OrderedComputeEnvironment(compute_environment=environment, order=1)],
            # Cancel a job that can never start (no instance type fits it, maxvCpus too small) instead
            # of leaving the pipeline waiting on it; give scarce GPU capacity a few hours.
            job_state_time_limit_actions=[
                batch.JobStateTimeLimitAction(
                    max_time=Duration.minutes(30),
                    reason=batch.JobStateTimeLimitActionsReason.JOB_RESOURCE_REQUIREMENT,
                ),
                batch.JobStateTimeLimitAction(
                    max_time=Duration.minutes(30),
                    reason=batch.JobStateTimeLimitActionsReason.COMPUTE_ENVIRONMENT_MAX_RESOURCE,
                ),
                batch.JobStateTimeLimitAction(
                    max_time=Duration.hours(4),
                    reason=batch.JobStateTimeLimitActionsReason.INSUFFICIENT_INSTANCE_CAPACITY,
                ),
            ],
        )

    def _job_role(self, bucket: s3.IBucket) -> iam.Role:
        role = iam.Role(
            self,
            "JobRole",
            assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description="topx train and search jobs: read and write runs/ in the data bucket",
        )
        role.add_to_policy(list_bucket(bucket))
        role.add_to_policy(read_runs(bucket))
        role.add_to_policy(write_runs(bucket))
        acknowledge_run_objects(role, bucket)
        return role

    def _logging(self, name: str) -> ecs.LogDriver:
        logs = log_group(self, f"{name.capitalize()}Logs", key=self._logs_key)
        return ecs.LogDrivers.aws_logs(stream_prefix=name, log_group=logs)


def _retry_strategies(job: str) -> list[batch.RetryStrategy]:
    """The job's retry rules as the deploy contract states them (the offline runner applies the same)."""
    actions = {"RETRY": batch.Action.RETRY, "EXIT": batch.Action.EXIT}
    return [
        batch.RetryStrategy.of(actions[rule["action"]], batch.Reason.custom(
            on_exit_code=rule.get("onExitCode"), on_reason=rule.get("onReason"),
            on_status_reason=rule.get("onStatusReason")))
        for rule in BATCH_RETRY_STRATEGIES[job]["evaluateOnExit"]
    ]
