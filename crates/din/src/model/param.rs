//! Parameters: a value, its gradient, its shape and its role.

/// What a tensor is for; decides how optimizers and regularisers treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A dense weight matrix (L2-regularised).
    Weight,
    /// A bias vector.
    Bias,
    /// A per-channel activation slope (PReLU or Dice alpha).
    Alpha,
    /// An embedding table (updated sparsely, row by row).
    Embedding,
    /// A running statistic (Dice moving mean/variance): saved, not trained.
    Statistic,
}

/// A named tensor of the model with its gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Values, row-major.
    pub value: Vec<f32>,
    /// Gradient, same length as `value` (empty for embeddings and statistics,
    /// whose gradients are not kept densely).
    pub grad: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
    /// Role.
    pub role: Role,
}

impl Param {
    /// A parameter with the given values.
    pub fn new(value: Vec<f32>, shape: Vec<usize>, role: Role) -> Self {
        debug_assert_eq!(value.len(), shape.iter().product::<usize>());
        let grad = match role {
            Role::Embedding | Role::Statistic => Vec::new(),
            _ => vec![0.0; value.len()],
        };
        Param {
            value,
            grad,
            shape,
            role,
        }
    }

    /// A parameter filled with `x`.
    pub fn filled(x: f32, shape: Vec<usize>, role: Role) -> Self {
        let n = shape.iter().product();
        Param::new(vec![x; n], shape, role)
    }

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }
}

/// Named references to every tensor of a module, for saving, loading and optimizing.
pub trait Module {
    /// Calls `f` with the full name and the tensor, in a fixed order.
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a Param));
    /// Same as [`Module::visit`], mutably.
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(String, &mut Param));
}
