# nginx doing the job balancer does, for the benchmarks that compare them (sourced by
# load.sh and instructions.sh): keep-alive to the backend, and the header work SPEC asks
# of balancer.
#
#   nginx_conf DIR WORKERS PORT BACKEND_PORT [EXTRA [HTTP_EXTRA [LOCATION_EXTRA [SERVER_EXTRA [UPSTREAM]]]]]
#                                                    # writes DIR/nginx.conf
#
# EXTRA: more top-level directives (instructions.sh runs nginx in one process under
# valgrind); HTTP_EXTRA, LOCATION_EXTRA and SERVER_EXTRA: more in `http`, in `location /`
# (cache.sh adds proxy_cache there) and in its `server` (load.sh's TLS and HTTP/2 listens);
# UPSTREAM: the `upstream app` block's body instead of the one backend, keepalive 256.
nginx_conf() {
  local dir=$1 workers=$2 port=$3 backend=$4 extra=${5:-} http_extra=${6:-} location_extra=${7:-}
  local server_extra=${8:-} upstream=${9:-"server 127.0.0.1:$backend; keepalive 256;"}
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CFG
worker_processes $workers;
$extra
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  upstream app { $upstream }
  $http_extra
  # The client's Host, X-Forwarded-*, and a request id kept from the client or made, sent
  # to the backend and returned to the client.
  map \$http_x_request_id \$rid { default \$http_x_request_id; "" \$request_id; }
  server {
    listen 127.0.0.1:$port backlog=1024;
    keepalive_requests 1000000;
    $server_extra
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$http_host;
      proxy_set_header X-Request-Id \$rid;
      add_header X-Request-Id \$rid always;
      $location_extra
    }
  }
}
CFG
}
