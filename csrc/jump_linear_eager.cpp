// jump_linear_eager (docs/methods.md, JumpLoRA): jump_linear with its autograd formula as a C++
// node, for eager calls (python/fastcur/ops/jump_linear.py takes it when an input needs a grad
// outside torch.compile and torch.func, which keep the Python-registered formula of the same
// two ops). Measured here at n = k = 16, M = 4 (2 threads, where only host time is left): the
// Python autograd node (its saved-tensor unpacking, the once-differentiable wrapper, four
// outputs checked and accumulated from Python) cost about 90 us per backward, as much as the
// adapter's own work per layer of a d = 256 model; this node calls the same `_bwd` op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace fastcur {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The identity on the first `count` tensors of `ins`; differentiating through it raises
// `message`. The `_bwd` ops have no derivative: under create_graph=True autograd would treat
// their outputs as constants and return a silently wrong second derivative. The rest of `ins`
// (the saved inputs that need a grad) ties the node into the graph, so a gradient of these
// gradients w.r.t. any of them reaches it (as `once_differentiable` in ops/_registry.py).
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  static variable_list forward(AutogradContext* ctx, const std::string& message, int64_t count,
                               at::TensorList ins) {
    ctx->saved_data["message"] = message;
    return variable_list(ins.begin(), ins.begin() + count);
  }
  static variable_list backward(AutogradContext* ctx, variable_list /*grads*/) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
  }
};

using BwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double, double,
                                          double, bool)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastcur::jump_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const c10::optional<at::Tensor>&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double,
                                               double, double, bool)>();
  return op;
}

const c10::TypedOperatorHandle<BwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      double, double, double, bool, bool, bool)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastcur::jump_linear_bwd", "")
                             .typed<BwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           double, double, double, bool, bool, bool)>();
  return op;
}

struct JumpLinearEager : public torch::autograd::Function<JumpLinearEager> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& log_theta, double scale,
                            double f, double bandwidth, bool mean) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, weight, A, B, log_theta});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["f"] = f;
    ctx->saved_data["bandwidth"] = bandwidth;
    ctx->saved_data["mean"] = mean;
    // needs_input_grad counts tensor inputs only: bias shifts A, B and log_theta by one
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return forward_op().call(x, weight, bias, A, B, log_theta, scale, f, bandwidth, mean);
  }

  // Gradients by forward argument: x, weight, bias, A, B, log_theta, then the four options.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &A = saved[2], &B = saved[3],
                     &log_theta = saved[4];
    const at::Tensor& grad_y = grads[0];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const size_t o = has_bias ? 1 : 0;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_a = ctx->needs_input_grad(2 + o), need_bb = ctx->needs_input_grad(3 + o),
               need_th = ctx->needs_input_grad(4 + o);
    const bool need_adapter = need_a || need_bb || need_th;
    variable_list out(10);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::AutoGradMode no_grad(false);
      if (need_x || need_adapter) {
        auto [dx, dA, dB, dth] = backward_op().call(
            grad_y, x, weight, A, B, log_theta, ctx->saved_data["scale"].toDouble(),
            ctx->saved_data["f"].toDouble(), ctx->saved_data["bandwidth"].toDouble(),
            ctx->saved_data["mean"].toBool(), need_x, need_adapter);
        if (need_x) out[0] = dx;
        if (need_a) out[3] = dA;
        if (need_bb) out[4] = dB;
        if (need_th) out[5] = dth;
      }
      if (need_w) out[1] = grad_y.t().mm(x);   // [n, k]: the gradient of W itself
      if (need_b) out[2] = grad_y.sum(0);
    }
    if (!at::GradMode::is_enabled()) return out;
    // create_graph=True: first-order gradients as usual, a clear error one order up.
    variable_list ins;
    std::vector<size_t> where;
    for (size_t i = 0; i < out.size(); ++i)
      if (out[i].defined()) {
        where.push_back(i);
        ins.push_back(out[i]);
      }
    const size_t count = ins.size();
    for (const at::Tensor& t : {grad_y, x, weight, A, B, log_theta})
      if (t.requires_grad()) ins.push_back(t);
    if (count == 0 || ins.size() == count) return out;
    const variable_list marked = NoDoubleBackward::apply(
        "fastcur.jump_linear: double backward (create_graph=True, then a gradient of these "
        "gradients) is not implemented by the fused kernels; run it under "
        "fastcur.use_backend('reference')",
        static_cast<int64_t>(count), at::TensorList(ins));   // (a TensorList: apply sees a
                                                              // vector as one non-tensor argument)
    for (size_t j = 0; j < count; ++j) out[where[j]] = marked[j];
    return out;
  }
};

at::Tensor jump_linear_eager_autograd(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& log_theta,
                                      double scale, double f, double bandwidth, bool mean) {
  return JumpLinearEager::apply(x, weight, bias, A, B, log_theta, scale, f, bandwidth, mean);
}

// Below autograd (inference mode): the op itself.
at::Tensor jump_linear_eager_plain(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& log_theta, double scale,
                                   double f, double bandwidth, bool mean) {
  return forward_op().call(x, weight, bias, A, B, log_theta, scale, f, bandwidth, mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, Autograd, m) {
  m.impl("jump_linear_eager", &jump_linear_eager_autograd);
}

TORCH_LIBRARY_IMPL(fastcur, CompositeExplicitAutograd, m) {
  m.impl("jump_linear_eager", &jump_linear_eager_plain);
}

}  // namespace fastcur
