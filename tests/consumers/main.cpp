// Consumer check shared by the three consumer projects (find_package, add_subdirectory,
// fetchcontent; each defines TITANS_CONSUMER_NAME): the titans headers compile and link through
// titans::titans, and a few public functions give the expected values. With
// TITANS_CONSUMER_CHECKPOINT it also round-trips a checkpoint through titans::checkpoint; with
// TITANS_CONSUMER_COMPILED (linked to titans::compiled, built with TITANS_COMPILED_SCALARS=double)
// it runs a double model, whose code then comes from that library, and the float memory MLP, whose
// code stays header-only.
#include <titans/titans.hpp>
#ifdef TITANS_CONSUMER_COMPILED
#ifndef TITANS_EXTERN_DOUBLE
#error "titans::compiled did not bring TITANS_EXTERN_DOUBLE"
#endif
#ifdef TITANS_EXTERN_FLOAT
#error "titans::compiled built for double only declared the float instantiations extern"
#endif
#include <cmath>
#endif
#ifdef TITANS_CONSUMER_CHECKPOINT
#include <titans/checkpoint.hpp>
#endif

#include <iostream>
#include <string>

namespace {

// A minimal parameter set (see titans/parameters.hpp).
struct Params {
  using scalar_type = double;
  titans::Matrix<double> w = titans::Matrix<double>::Constant(3, 4, 0.5);  // (3, 4)
  titans::Matrix<double> b = titans::Matrix<double>::Ones(3, 1);           // (3, 1)

  template <class F>
  void for_each(F&& f) {
    f(std::string("w"), w);
    f(std::string("b"), b);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("w"), w);
    f(std::string("b"), b);
  }
};

}  // namespace

int main() {
  const Params p;
  const Params g = titans::zeros_like(p);
  titans::check_same_layout("consumer", p, g);
  bool ok = titans::parameter_count(p) == 15 && p.w.sum() == 6.0 && g.w.sum() == 0.0 &&
            g.b.sum() == 0.0 && titans::parameter_names(p).size() == 2;
#ifdef TITANS_CONSUMER_CHECKPOINT
  Params loaded = g;
  const auto bytes = titans::save_checkpoint_to_memory(p);
  titans::load_checkpoint_from_memory(bytes, loaded);
  ok = ok && loaded.w == p.w && loaded.b == p.b;
#endif
#ifdef TITANS_CONSUMER_COMPILED
  {
    titans::ModelConfig cfg;
    cfg.vocab = 16;
    cfg.block.dim = 16;
    cfg.block.attention_heads = 2;
    cfg.block.segment = 4;
    cfg.block.window = 4;
    cfg.block.memory.dim = 16;
    cfg.block.memory.heads = 2;
    cfg.layers = {titans::BlockKind::mac, titans::BlockKind::swa};
    const titans::TitansModel<double> model(cfg);
    const auto params = model.init(7);
    auto state = model.initial_state(params);
    const titans::Matrix<double> logits = model.forward(params, {1, 2, 3, 4, 5, 6}, state);
    ok = ok && logits.rows() == 16 && logits.cols() == 6 && logits.allFinite();

    // The float memory MLP: small (its compile is what this test costs beside the library's)
    // and still from the headers alone, since the library holds only double.
    titans::MemoryConfig mcfg;
    mcfg.dim = 8;
    const auto mw = titans::init_memory_weights<float>(mcfg, 3);
    const titans::Matrix<float> o = titans::memory_apply<float>(mcfg, mw.w, titans::Matrix<float>::Ones(8, 5), {});
    ok = ok && o.rows() == 8 && o.cols() == 5 && o.allFinite();
  }
#endif
  if (!ok) {
    std::cerr << "titans consumer (" TITANS_CONSUMER_NAME "): unexpected values\n";
    return 1;
  }
  std::cout << "titans consumer (" TITANS_CONSUMER_NAME "): ok\n";
  return 0;
}
