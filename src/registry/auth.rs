//! Registry credentials from a Docker config file (a `kubernetes.io/dockerconfigjson` Secret).
//! (Interface stub.)
