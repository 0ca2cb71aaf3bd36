"""deploy/ validated offline (no Kubernetes cluster, no Docker engine), by concern:

- ``render``: the kustomize renderer, the built pods, the Secrets' test values (helpers);
- ``servers``: Redis as deploy/ ships it, for real -- the ACL generator, the per-pod sidecar's
  redis-server, the 6-node cluster created by the create Job's script (helpers);
- ``test_manifests``: kubernetes-validate, compose-spec, yamllint, POSIX sh, the READMEs;
- ``test_pod_shape`` / ``test_shared_shape``: the per-pod and the shared variant's pods;
- ``test_acl_files``: what ``gen-users-acl.sh`` writes;
- ``test_redis_users`` / ``test_cluster_users``: the real publisher, subscribers and CLI
  under their users, and what each user is refused;
- ``test_image``: the Dockerfile and .dockerignore.
"""
